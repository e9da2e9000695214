//! Builds the TC programs for the bpf target and leaves two objects in
//! OUT_DIR, where `src/datapath.rs` embeds them: `sluice-tc` (production:
//! what the agent loads) and `sluice-tc-bench` (built with sluice-ebpf's
//! `bench` feature: also the baselines and breakdown programs of
//! `cargo xtask bench datapath` and the data path test harness). The nightly
//! is pinned in scripts/setup.sh (it needs -Z build-std=core and rust-src).
use std::path::Path;

use anyhow::{Context as _, anyhow, bail};
use object::{Object as _, ObjectSymbol as _, SymbolKind};

const EBPF_TOOLCHAIN: &str = "nightly-2026-10-30";
/// The bin target of sluice-ebpf, and the name aya-build gives its object.
const OBJECT: &str = "sluice-tc";
const BENCH_OBJECT: &str = "sluice-tc-bench";

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
    // The object's BTF names its source files. aya-build's cargo (the
    // pinned nightly) sets its own rustflags, so `--remap-path-prefix`
    // cannot reach it; cargo's trim-paths (nightly, enabled through its
    // environment, which that cargo inherits from this script) makes the
    // paths relative, so two checkouts of one commit embed the same object
    // (the image's reproducibility, docs/design.md).
    // SAFETY: build scripts are single-threaded; nothing reads the
    // environment concurrently.
    unsafe {
        std::env::set_var("CARGO_UNSTABLE_TRIM_PATHS", "true");
        std::env::set_var("CARGO_PROFILE_RELEASE_TRIM_PATHS", "all");
        std::env::set_var("CARGO_PROFILE_DEV_TRIM_PATHS", "all");
    }
    let out_dir = std::env::var_os("OUT_DIR").context("OUT_DIR not set")?;
    let out_dir = Path::new(&out_dir);
    let build = |features: &[&str]| {
        aya_build::build_ebpf(
            [aya_build::Package {
                name: pkg.name.as_str(),
                root_dir: root.as_str(),
                features,
                ..Default::default()
            }],
            aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
        )
    };
    // Both builds share aya-build's target directory, so the dependencies
    // (core, aya-ebpf) are built once; only sluice-ebpf itself is compiled
    // twice. aya-build names the object after the bin target, hence the
    // rename between the two.
    build(&["bench"])?;
    if std::env::var_os("AYA_BUILD_SKIP")
        .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
    {
        return Ok(());
    }
    std::fs::rename(out_dir.join(OBJECT), out_dir.join(BENCH_OBJECT))
        .with_context(|| format!("renaming {OBJECT} to {BENCH_OBJECT}"))?;
    build(&[])?;
    let production = std::fs::read(out_dir.join(OBJECT)).context("reading the object")?;
    let bench = std::fs::read(out_dir.join(BENCH_OBJECT)).context("reading the bench object")?;
    let (in_production, in_bench) = (bench_programs(&production)?, bench_programs(&bench)?);
    if !in_production.is_empty() {
        bail!("the production object {OBJECT} carries bench programs: {in_production:?}");
    }
    // Keeps the check above honest: the names it looks for are the ones
    // the bench object really has.
    if in_bench.is_empty() {
        bail!("{BENCH_OBJECT} has no bench programs: the `bench` feature is not in effect");
    }
    Ok(())
}

/// The functions of `elf` that only the benches and tests use: `noop` and
/// `bench_*`.
fn bench_programs(elf: &[u8]) -> anyhow::Result<Vec<String>> {
    let file = object::File::parse(elf).context("parsing the eBPF object")?;
    Ok(file
        .symbols()
        .filter(|s| s.kind() == SymbolKind::Text)
        .filter_map(|s| s.name().ok())
        .filter(|n| *n == "noop" || n.starts_with("bench_"))
        .map(str::to_owned)
        .collect())
}
