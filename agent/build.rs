//! Builds the TC programs for the bpf target and leaves the object in OUT_DIR,
//! where `src/datapath.rs` embeds it. The nightly is pinned in
//! scripts/setup.sh (it needs -Z build-std=core and rust-src).
use anyhow::{Context as _, anyhow};

const EBPF_TOOLCHAIN: &str = "nightly-2026-10-30";

fn main() -> anyhow::Result<()> {
    let meta = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let pkg = meta
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "sluice-ebpf")
        .ok_or_else(|| anyhow!("sluice-ebpf package not found"))?;
    let root = pkg
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", pkg.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: pkg.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}
