use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::*;

struct Tmp(PathBuf);
impl Tmp {
    fn new(tag: &str) -> Tmp {
        let p = std::env::temp_dir().join(format!(
            "sluice-image-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        fs::remove_dir_all(&p).ok();
        fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }
}
impl Drop for Tmp {
    fn drop(&mut self) {
        fs::remove_dir_all(&self.0).ok();
    }
}

fn spec(src: &Path) -> Spec {
    Spec {
        name: "example.org/test/app:1.2".into(),
        entries: vec![
            Entry::File {
                path: "/usr/local/bin/app".into(),
                source: src.to_path_buf(),
                mode: 0o755,
            },
            Entry::Bytes {
                path: "/etc/app/conf".into(),
                data: b"x=1\n".to_vec(),
                mode: 0o644,
            },
            Entry::Symlink {
                path: "/bin/app".into(),
                target: "/usr/local/bin/app".into(),
            },
        ],
        entrypoint: vec!["/usr/local/bin/app".into()],
        env: vec!["PATH=/bin".into()],
        labels: BTreeMap::from([("a".into(), "b".into())]),
        ..Spec::default()
    }
}

#[test]
fn same_inputs_same_digest_whatever_the_order_and_mtimes() {
    let t = Tmp::new("det");
    let src = t.0.join("app.bin");
    fs::write(&src, b"binary").unwrap();
    let a = build(&spec(&src), &t.0.join("a")).unwrap();
    // Touch the source (new mtime) and list the entries backwards.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    fs::write(&src, b"binary").unwrap();
    let mut s = spec(&src);
    s.entries.reverse();
    let b = build(&s, &t.0.join("b")).unwrap();
    assert_eq!(a.digest, b.digest);
    assert_eq!(fs::read(&a.archive).unwrap(), fs::read(&b.archive).unwrap());
    // Content matters.
    fs::write(&src, b"binary2").unwrap();
    let c = build(&spec(&src), &t.0.join("c")).unwrap();
    assert_ne!(a.digest, c.digest);
}

#[test]
fn layout_is_a_valid_oci_layout_whose_blobs_match_their_digests() {
    let t = Tmp::new("layout");
    let src = t.0.join("app.bin");
    fs::write(&src, b"binary").unwrap();
    let built = build(&spec(&src), &t.0).unwrap();
    assert_eq!(built.layout, t.0.join("app"));
    assert_eq!(built.archive, t.0.join("app.tar"));
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(built.layout.join("index.json")).unwrap()).unwrap();
    let m = &index["manifests"][0];
    assert_eq!(m["digest"], built.digest.as_str());
    assert_eq!(
        m["annotations"][CONTAINERD_NAME],
        "example.org/test/app:1.2"
    );
    assert_eq!(m["annotations"][REF_NAME], "1.2");
    let blob = |d: &str| fs::read(built.layout.join("blobs/sha256").join(&d[7..])).unwrap();
    for entry in fs::read_dir(built.layout.join("blobs/sha256")).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        assert_eq!(sha256(&fs::read(&p).unwrap()), format!("sha256:{name}"));
    }
    let manifest: serde_json::Value = serde_json::from_slice(&blob(&built.digest)).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&blob(manifest["config"]["digest"].as_str().unwrap())).unwrap();
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["config"]["Entrypoint"][0], "/usr/local/bin/app");
    assert!(
        config.get("created").is_none(),
        "a creation time breaks reproducibility"
    );
    // The layer's diff_id is the digest of the uncompressed tar.
    let gz = blob(manifest["layers"][0]["digest"].as_str().unwrap());
    let mut tar_bytes = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut tar_bytes).unwrap();
    assert_eq!(config["rootfs"]["diff_ids"][0], sha256(&tar_bytes).as_str());
    let mut archive = tar::Archive::new(&tar_bytes[..]);
    let listed: Vec<(String, u32, u64)> = archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let h = e.header();
            (
                e.path().unwrap().to_string_lossy().into_owned(),
                h.mode().unwrap(),
                h.mtime().unwrap(),
            )
        })
        .collect();
    let names: Vec<&str> = listed.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "bin/",
            "bin/app",
            "etc/",
            "etc/app/",
            "etc/app/conf",
            "usr/",
            "usr/local/",
            "usr/local/bin/",
            "usr/local/bin/app"
        ]
    );
    assert!(listed.iter().all(|(_, _, mtime)| *mtime == epoch()));
    assert_eq!(
        listed
            .iter()
            .find(|(n, _, _)| n == "usr/local/bin/app")
            .unwrap()
            .1,
        0o755
    );
}

#[test]
fn bad_paths_names_and_duplicates_are_refused() {
    let t = Tmp::new("bad");
    for p in ["relative", "/", "/a/../b", "/a//b", "/a/"] {
        let s = Spec {
            name: "x.org/a:1".into(),
            entries: vec![Entry::Dir {
                path: p.into(),
                mode: 0o755,
            }],
            ..Spec::default()
        };
        assert!(matches!(build(&s, &t.0), Err(Error::BadPath(_))), "{p}");
    }
    let dup = Spec {
        name: "x.org/a:1".into(),
        entries: vec![
            Entry::Dir {
                path: "/a".into(),
                mode: 0o755,
            },
            Entry::Symlink {
                path: "/a".into(),
                target: "b".into(),
            },
        ],
        ..Spec::default()
    };
    assert!(matches!(build(&dup, &t.0), Err(Error::Duplicate(_))));
    for n in ["sluice", "sluice:1", "x.org/sluice", "x.org/:1"] {
        let s = Spec {
            name: n.into(),
            ..Spec::default()
        };
        assert!(matches!(build(&s, &t.0), Err(Error::BadName(_))), "{n}");
    }
}

/// An independent reader (Debian's skopeo, from scripts/setup.sh) accepts the archive.
#[test]
fn skopeo_reads_the_archive() {
    let t = Tmp::new("skopeo");
    let src = t.0.join("app.bin");
    fs::write(&src, b"binary").unwrap();
    let built = build(&spec(&src), &t.0).unwrap();
    let out = std::process::Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci-archive:{}", built.archive.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        sha256(&out.stdout),
        built.digest,
        "skopeo sees the manifest we wrote"
    );
}
