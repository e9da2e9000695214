//! OCI images built without a registry or a Docker daemon.
//!
//! One layer, written deterministically: entries sorted by path, every parent
//! directory present, owner 0:0, every timestamp fixed (`SOURCE_DATE_EPOCH`,
//! else 0), gzip without a name or time in its header. The config carries no
//! creation time. The same inputs therefore give the same manifest digest,
//! whatever the order the caller listed them in or the files' mtimes.
//!
//! The output is an OCI image layout directory and the same layout as a tar
//! (an "OCI archive"), which `ctr images import` and `skopeo copy
//! oci-archive:...` take. The manifests are built with `oci-spec`, the layer
//! with `tar` and `flate2`.
use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr as _;

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, Digest, ImageConfigurationBuilder,
    ImageIndexBuilder, ImageManifestBuilder, MediaType, Os, RootFsBuilder, SCHEMA_VERSION,
};
use sha2::{Digest as _, Sha256};

/// containerd names an imported image after this index annotation.
const CONTAINERD_NAME: &str = "io.containerd.image.name";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image spec: {0}")]
    Spec(#[from] oci_spec::OciSpecError),
    #[error("entry {0:?}: paths are absolute, without `.`, `..` or a trailing `/`")]
    BadPath(String),
    #[error("entry {0:?} listed twice")]
    Duplicate(String),
    #[error(
        "image name {0:?}: expected a full reference with a tag, e.g. docker.io/library/sluice:0.1.0"
    )]
    BadName(String),
    #[error("busybox applets: {0}")]
    Busybox(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One thing in the image's filesystem. Paths are absolute (`/usr/local/bin/x`).
#[derive(Debug, Clone)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    /// A file copied from the build machine.
    File {
        path: String,
        source: PathBuf,
        mode: u32,
    },
    Bytes {
        path: String,
        data: Vec<u8>,
        mode: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
}

impl Entry {
    fn path(&self) -> &str {
        match self {
            Entry::Dir { path, .. }
            | Entry::File { path, .. }
            | Entry::Bytes { path, .. }
            | Entry::Symlink { path, .. } => path,
        }
    }
}

/// What to build.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    /// The full reference, e.g. `docker.io/library/sluice:0.1.0`.
    pub name: String,
    pub entries: Vec<Entry>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// What was built.
#[derive(Debug, Clone)]
pub struct Built {
    /// `sha256:...` of the image manifest: the image's identity.
    pub digest: String,
    /// The OCI image layout directory.
    pub layout: PathBuf,
    /// The layout as one tar (an OCI archive).
    pub archive: PathBuf,
}

/// Builds `spec` into `out_dir/<image>/` (layout) and `out_dir/<image>.tar`,
/// where `<image>` is the last path component of the name without the tag.
pub fn build(spec: &Spec, out_dir: &Path) -> Result<Built, Error> {
    let (short, tag) = short_name(&spec.name)?;
    let layout = out_dir.join(short);
    let archive = out_dir.join(format!("{short}.tar"));
    if layout.exists() {
        fs::remove_dir_all(&layout).map_err(io(&layout))?;
    }
    let blobs = layout.join("blobs").join("sha256");
    fs::create_dir_all(&blobs).map_err(io(&blobs))?;

    let layer_tar = layer(&spec.entries)?;
    let diff_id = sha256(&layer_tar);
    let layer_gz = gzip(&layer_tar, &layout)?;
    let layer_desc = write_blob(&blobs, &layer_gz, MediaType::ImageLayerGzip)?;

    let mut config = ConfigBuilder::default()
        .entrypoint(spec.entrypoint.clone())
        .env(spec.env.clone())
        .labels(
            spec.labels
                .clone()
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>(),
        );
    if !spec.cmd.is_empty() {
        config = config.cmd(spec.cmd.clone());
    }
    let image_config = ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(config.build()?)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![diff_id])
                .build()?,
        )
        .build()?;
    let config_desc = write_blob(&blobs, &canonical(&image_config)?, MediaType::ImageConfig)?;

    let manifest = ImageManifestBuilder::default()
        .schema_version(SCHEMA_VERSION)
        .media_type(MediaType::ImageManifest)
        .config(config_desc)
        .layers(vec![layer_desc])
        .build()?;
    let mut manifest_desc = write_blob(&blobs, &canonical(&manifest)?, MediaType::ImageManifest)?;
    let digest = manifest_desc.digest().to_string();
    manifest_desc.set_annotations(Some(
        [
            (CONTAINERD_NAME.to_string(), spec.name.clone()),
            (REF_NAME.to_string(), tag.to_string()),
        ]
        .into_iter()
        .collect(),
    ));
    let index = ImageIndexBuilder::default()
        .schema_version(SCHEMA_VERSION)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest_desc])
        .build()?;
    write(&layout.join("index.json"), &canonical(&index)?)?;
    write(
        &layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    write(&archive, &archive_of(&layout)?)?;
    Ok(Built {
        digest,
        layout,
        archive,
    })
}

/// `docker.io/library/sluice:0.1.0` -> (`sluice`, `0.1.0`).
fn short_name(name: &str) -> Result<(&str, &str), Error> {
    let last = name.rsplit('/').next().unwrap_or(name);
    match last.split_once(':') {
        Some((short, tag)) if !short.is_empty() && !tag.is_empty() && name.contains('/') => {
            Ok((short, tag))
        }
        _ => Err(Error::BadName(name.to_string())),
    }
}

/// The fixed timestamp of every layer entry.
fn epoch() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn check_path(p: &str) -> Result<&str, Error> {
    let rel = p
        .strip_prefix('/')
        .ok_or_else(|| Error::BadPath(p.into()))?;
    if rel.is_empty()
        || rel.ends_with('/')
        || rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(Error::BadPath(p.into()));
    }
    Ok(rel)
}

/// The layer as an uncompressed tar: sorted, parents first, fixed metadata.
fn layer(entries: &[Entry]) -> Result<Vec<u8>, Error> {
    let mut by_path: BTreeMap<&str, &Entry> = BTreeMap::new();
    for e in entries {
        let rel = check_path(e.path())?;
        if by_path.insert(rel, e).is_some() {
            return Err(Error::Duplicate(e.path().into()));
        }
    }
    // Parent directories nobody listed: 0755.
    let mut parents = BTreeMap::new();
    for rel in by_path.keys() {
        let mut acc = String::new();
        for comp in rel
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map(|(_, p)| p)
            .unwrap_or(&[])
        {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(comp);
            if !by_path.contains_key(acc.as_str()) {
                parents.insert(acc.clone(), ());
            }
        }
    }
    let parent_dirs: Vec<Entry> = parents
        .into_keys()
        .map(|p| Entry::Dir {
            path: format!("/{p}"),
            mode: 0o755,
        })
        .collect();
    let mut all: BTreeMap<String, &Entry> =
        by_path.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    for d in &parent_dirs {
        all.insert(d.path()[1..].to_string(), d);
    }

    let mtime = epoch();
    let mut tar = tar::Builder::new(Vec::new());
    tar.mode(tar::HeaderMode::Deterministic);
    for (rel, e) in all {
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(mtime);
        let empty = std::io::empty();
        let here = PathBuf::from(&rel);
        match e {
            Entry::Dir { mode, .. } => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                tar.append_data(&mut h, format!("{rel}/"), empty)
                    .map_err(io(&here))?;
            }
            Entry::File { source, mode, .. } => {
                let data = fs::read(source).map_err(io(source))?;
                file(&mut tar, &mut h, &rel, &data, *mode)?;
            }
            Entry::Bytes { data, mode, .. } => file(&mut tar, &mut h, &rel, data, *mode)?,
            Entry::Symlink { target, .. } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                tar.append_link(&mut h, &rel, target).map_err(io(&here))?;
            }
        }
    }
    tar.into_inner().map_err(io(Path::new("layer")))
}

fn file(
    tar: &mut tar::Builder<Vec<u8>>,
    h: &mut tar::Header,
    rel: &str,
    data: &[u8],
    mode: u32,
) -> Result<(), Error> {
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    tar.append_data(h, rel, data).map_err(io(Path::new(rel)))
}

fn gzip(data: &[u8], ctx: &Path) -> Result<Vec<u8>, Error> {
    // GzBuilder writes mtime 0 and no file name unless told otherwise.
    let mut gz = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::best());
    gz.write_all(data).map_err(io(ctx))?;
    gz.finish().map_err(io(ctx))
}

fn sha256(data: &[u8]) -> String {
    let sum = Sha256::digest(data);
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in sum {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// JSON with a stable key order (serde_json's maps are sorted).
fn canonical<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, Error> {
    let value = serde_json::to_value(v).map_err(|e| Error::Io {
        path: PathBuf::from("json"),
        source: e.into(),
    })?;
    serde_json::to_vec(&value).map_err(|e| Error::Io {
        path: PathBuf::from("json"),
        source: e.into(),
    })
}

fn write_blob(blobs: &Path, data: &[u8], media: MediaType) -> Result<Descriptor, Error> {
    let digest = sha256(data);
    let hex = &digest["sha256:".len()..];
    write(&blobs.join(hex), data)?;
    Ok(DescriptorBuilder::default()
        .media_type(media)
        .digest(Digest::from_str(&digest)?)
        .size(data.len() as u64)
        .build()?)
}

fn write(path: &Path, data: &[u8]) -> Result<(), Error> {
    fs::write(path, data).map_err(io(path))
}

/// The layout directory as one deterministic tar.
fn archive_of(layout: &Path) -> Result<Vec<u8>, Error> {
    let mut files = Vec::new();
    collect(layout, layout, &mut files)?;
    files.sort();
    let mtime = epoch();
    let mut tar = tar::Builder::new(Vec::new());
    for rel in files {
        let full = layout.join(&rel);
        let data = fs::read(&full).map_err(io(&full))?;
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(mtime);
        file(&mut tar, &mut h, &rel, &data, 0o644)?;
    }
    tar.into_inner().map_err(io(layout))
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), Error> {
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        if path.is_dir() {
            collect(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(rel.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

/// Debian's `busybox-static`: the binary, a symlink per applet under /bin,
/// and the few files a container expects (/etc/passwd, /etc/group, /tmp).
pub fn busybox_entries(busybox: &Path) -> Result<Vec<Entry>, Error> {
    let out = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(io(busybox))?;
    if !out.status.success() {
        return Err(Error::Busybox(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    let list = String::from_utf8_lossy(&out.stdout);
    let mut entries = vec![
        Entry::File {
            path: "/bin/busybox".into(),
            source: busybox.to_path_buf(),
            mode: 0o755,
        },
        Entry::Bytes {
            path: "/etc/passwd".into(),
            data: b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n".to_vec(),
            mode: 0o644,
        },
        Entry::Bytes {
            path: "/etc/group".into(),
            data: b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
            mode: 0o644,
        },
        Entry::Dir {
            path: "/tmp".into(),
            mode: 0o1777,
        },
        Entry::Dir {
            path: "/root".into(),
            mode: 0o700,
        },
    ];
    for applet in list
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        if applet.contains('/') {
            return Err(Error::Busybox(format!("odd applet name {applet:?}")));
        }
        entries.push(Entry::Symlink {
            path: format!("/bin/{applet}"),
            target: "busybox".into(),
        });
    }
    Ok(entries)
}

/// A busybox image (`sh` by default) from the machine's `/bin/busybox`.
pub fn busybox(name: &str, out_dir: &Path) -> Result<Built, Error> {
    build(
        &Spec {
            name: name.to_string(),
            entries: busybox_entries(Path::new("/bin/busybox"))?,
            cmd: vec!["sh".into()],
            env: vec!["PATH=/bin".into()],
            ..Spec::default()
        },
        out_dir,
    )
}

#[cfg(test)]
mod tests;
