//! `cargo xtask image`: the OCI image the DaemonSet runs, built without a
//! registry or a Docker daemon (crate sluice-image), reproducibly.
//!
//! The binaries are release builds linked statically against glibc
//! (`+crt-static`, so the image needs no libc and no loader), with the
//! checkout's and cargo's paths remapped so that two checkouts of one commit
//! produce the same bytes. The image holds the two binaries and nothing else:
//! no shell, the CNI install step is `sluice-agent install-cni`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use object::Object as _;
use sluice_image::{Entry, Spec};

const TARGET: &str = "x86_64-unknown-linux-gnu";
const BINARIES: [&str; 2] = ["sluice", "sluice-agent"];

#[derive(clap::Args)]
pub struct Args {
    /// The image reference (containerd names the imported image so).
    #[arg(long, default_value = concat!("docker.io/library/sluice:", env!("CARGO_PKG_VERSION")))]
    name: String,
    /// Where the OCI layout directory and the archive go.
    #[arg(long, default_value = "target/image")]
    out: PathBuf,
    /// Take `sluice` and `sluice-agent` from this directory instead of the
    /// static release build (quicker; the result is not the shipped image).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Build a busybox test image from the machine's /bin/busybox instead.
    #[arg(long)]
    busybox: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let root = repo_root()?;
    let out = root.join(&args.out);
    std::fs::create_dir_all(&out).with_context(|| out.display().to_string())?;
    let built = if args.busybox {
        sluice_image::busybox(&args.name, &out)?
    } else {
        let bins = match &args.bin_dir {
            Some(dir) => dir.clone(),
            None => release_static(&root)?,
        };
        for b in BINARIES {
            check_static(&bins.join(b))?;
        }
        sluice_image::build(&spec(&args.name, &bins, &root)?, &out)?
    };
    println!("image   {}", args.name);
    println!("layout  {}", built.layout.display());
    println!("archive {}", built.archive.display());
    println!("digest  {}", built.digest);
    Ok(())
}

fn repo_root() -> Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

/// Release binaries, statically linked, with build paths remapped.
fn release_static(root: &Path) -> Result<PathBuf> {
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| Path::new(&h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    // Target-specific flags: they reach the host binaries, not build scripts
    // and not the eBPF crate that agent/build.rs builds for bpfel.
    let flags = format!(
        "-C target-feature=+crt-static --remap-path-prefix={}=/sluice --remap-path-prefix={}=/cargo",
        root.display(),
        cargo_home.display()
    );
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root)
        .env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS", flags)
        .env("CARGO_INCREMENTAL", "0")
        .args(["build", "--release", "--locked", "--target", TARGET])
        .args(["-p", "sluice-agent", "-p", "sluice-cni", "--bins"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("the release build failed");
    }
    let target_dir = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    Ok(target_dir.join(TARGET).join("release"))
}

/// No program interpreter and no shared libraries: the image has neither.
fn check_static(bin: &Path) -> Result<()> {
    let data = std::fs::read(bin).with_context(|| bin.display().to_string())?;
    let file = object::File::parse(&*data)
        .with_context(|| format!("{}: not an ELF file", bin.display()))?;
    if file.section_by_name(".interp").is_some() {
        bail!(
            "{} is dynamically linked (it has a program interpreter); build it with +crt-static \
             or leave out --bin-dir",
            bin.display()
        );
    }
    if file.imports().map(|i| !i.is_empty()).unwrap_or(false) {
        bail!("{} imports shared-library symbols", bin.display());
    }
    Ok(())
}

fn spec(name: &str, bins: &Path, root: &Path) -> Result<Spec> {
    let mut entries: Vec<Entry> = BINARIES
        .iter()
        .map(|b| Entry::File {
            path: format!("/usr/local/bin/{b}"),
            source: bins.join(b),
            mode: 0o755,
        })
        .collect();
    // Mount points the DaemonSet uses, present so a read-only root works.
    for dir in ["/etc/sluice", "/run/sluice", "/var/lib/sluice"] {
        entries.push(Entry::Dir {
            path: dir.into(),
            mode: 0o755,
        });
    }
    let mut labels = BTreeMap::from([
        (
            "org.opencontainers.image.title".to_string(),
            "sluice".to_string(),
        ),
        (
            "org.opencontainers.image.version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        (
            "org.opencontainers.image.licenses".to_string(),
            "Apache-2.0".to_string(),
        ),
    ]);
    if let Some(rev) = git_head(root) {
        labels.insert("org.opencontainers.image.revision".into(), rev);
    }
    Ok(Spec {
        name: name.to_string(),
        entries,
        entrypoint: vec!["/usr/local/bin/sluice-agent".into()],
        labels,
        ..Spec::default()
    })
}

fn git_head(root: &Path) -> Option<String> {
    let out = Command::new("git")
        .current_dir(root)
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
