//! The data path from user space: the only module that imports aya.
//!
//! - `maps`: typed handles on every map, key encoding (private);
//! - `attach`: the programs on pod veths, uplinks and the node's cgroup;
//! - `writer`: every map write the agent makes, in the order that keeps
//!   the data path correct at each instant (gap-free policy replace, fail
//!   closed);
//! - `events`: the drop-event ring buffer;
//! - `counters`: what the data path counts, read from the pins (metrics).
//!
//! bpffs layout under the pin directory:
//!   maps/<NAME>            every map, pinned by name (reused on restart)
//!   links/<ifname>-from    TCX link of `from_pod` (ingress hook of the host veth)
//!   links/<ifname>-to      TCX link of `to_pod`   (egress hook of the host veth)
//!   links/<ifname>-uplink  TCX link of `to_uplink` (egress of an uplink)
//!   links/<ifname>-{from,to,uplink}-clsact   a directory marking a clsact filter
//!   links/cgroup-to_host-{a,b}   cgroup link of `to_host` (ingress of the node's sockets)
mod attach;
pub mod counters;
mod events;
mod maps;
mod writer;

use std::path::{Path, PathBuf};

pub use attach::{AttachMode, Programs, RemovedLinks};
use aya::{
    EbpfLoader,
    maps::{MapError, RingBuf},
    programs::{CgroupSkb, ProgramError, SchedClassifier, links::LinkError},
};
pub use events::{DropEvents, FlowEventsMap};
pub use maps::{Maps, Sizes};
use sluice_common::{maps as names, programs};
pub use writer::{EndpointRecord, Established, Writer};

/// The TC programs, built by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-tc"));
/// The same programs plus the bench-only ones (`noop`, `bench_*`; sluice-ebpf's
/// `bench` feature), for `cargo xtask bench datapath` and the data path
/// tests. The agent never loads it.
pub static EBPF_BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-tc-bench"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("program {0} missing from the object")]
    MissingProgram(&'static str),
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("link {path}")]
    Link {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("pinning {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// The loaded data path: its programs, the writer of its maps, and the
/// sizes asked for at load (a reused pinned map keeps its own).
pub struct Datapath {
    pub programs: Programs,
    pub writer: Writer,
    pub sizes: Sizes,
}

impl Datapath {
    /// Loads the programs, reusing every map already pinned under
    /// `pin_dir/maps` (so a restart loses no state) and pinning new ones.
    /// `pin_dir` must be on a bpffs. The drop-event ring buffer comes back
    /// apart: one reader follows it.
    pub fn load(pin_dir: &Path, sizes: &Sizes, mode: AttachMode) -> Result<(Self, DropEvents)> {
        for sub in ["maps", "links"] {
            let p = pin_dir.join(sub);
            std::fs::create_dir_all(&p).map_err(|source| DatapathError::Io { path: p, source })?;
        }
        raise_memlock();
        let maps_dir = pin_dir.join("maps");
        drop_outgrown(
            &maps_dir,
            names::CONNTRACK,
            size_of::<sluice_common::CtValue>(),
        )?;
        drop_outgrown(
            &maps_dir,
            names::POLICY,
            size_of::<sluice_common::PolicyValue>(),
        )?;
        // A map pinned by an earlier agent keeps its size (the loader
        // refuses a pin whose size differs from the one asked for).
        let sizes = &Sizes {
            policy: pinned_size(&maps_dir, names::POLICY, sizes.policy)?,
            endpoints: pinned_size(&maps_dir, names::ENDPOINTS, sizes.endpoints)?,
            ipcache: pinned_size(&maps_dir, names::IPCACHE, sizes.ipcache)?,
            cidrs: pinned_size(&maps_dir, names::CIDRS, sizes.cidrs)?,
            peer_classes: pinned_size(&maps_dir, names::PEER_CLASSES, sizes.peer_classes)?,
            ..sizes.clone()
        };
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .map_max_entries(names::CONNTRACK, sizes.conntrack)
            .map_max_entries(names::POLICY, sizes.policy)
            .map_max_entries(names::ENDPOINTS, sizes.endpoints)
            .map_max_entries(names::EP_BY_ID, sizes.endpoints)
            .map_max_entries(names::IPCACHE, sizes.ipcache)
            .map_max_entries(names::CIDRS, sizes.cidrs)
            .map_max_entries(names::PEER_CLASSES, sizes.peer_classes)
            .load(EBPF_OBJECT)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        for name in [programs::FROM_POD, programs::TO_POD, programs::TO_UPLINK] {
            attach::program_mut::<SchedClassifier>(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        attach::program_mut::<CgroupSkb>(&mut ebpf, programs::TO_HOST)?
            .load()
            .map_err(|source| DatapathError::Program {
                name: programs::TO_HOST,
                source,
            })?;
        let maps =
            Maps::from_source(|name| ebpf.take_map(name).ok_or(DatapathError::MissingMap(name)))?;
        let ring: RingBuf<_> = ebpf
            .take_map(names::DROP_EVENTS)
            .ok_or(DatapathError::MissingMap(names::DROP_EVENTS))
            .and_then(|m| maps::typed(names::DROP_EVENTS, m))?;
        let mut loaded = attach::Loaded {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            mode: AttachMode::Auto,
        };
        loaded.set_attach_mode(mode);
        let programs = Programs::new(loaded);
        Ok((
            Self {
                programs,
                writer: Writer::new(maps)?,
                sizes: sizes.clone(),
            },
            DropEvents::new(ring),
        ))
    }

    pub fn pin_dir(&self) -> &Path {
        self.programs.pin_dir()
    }
}

/// What `remove_pins` took away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub links: RemovedLinks,
    pub maps: usize,
}

/// Uninstall: detaches every link and filter pinned under `pin_dir`, then
/// removes the map pins and the directories. Run with the agent stopped: a
/// running agent holds its maps (they live on until it exits) and would
/// pin new links. A missing `pin_dir` is nothing to do.
pub fn remove_pins(pin_dir: &Path) -> Result<Removed> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| DatapathError::Io { path, source }
    };
    let links_dir = pin_dir.join("links");
    let links = attach::remove_link_pins(&links_dir)?;
    let maps_dir = pin_dir.join("maps");
    let mut maps = 0;
    match std::fs::read_dir(&maps_dir) {
        Ok(entries) => {
            for e in entries {
                let path = e.map_err(io_err(&maps_dir))?.path();
                sluice_common::not_found_ok(std::fs::remove_file(&path)).map_err(io_err(&path))?;
                maps += 1;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&maps_dir)(e)),
    }
    for dir in [&links_dir, &maps_dir, pin_dir] {
        match std::fs::remove_dir(dir) {
            Ok(()) => {}
            // Gone already, or the mount point of a bpffs of its own
            // (not ours to remove), or holding what another tool put there.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::EBUSY | libc::ENOTEMPTY)
                ) =>
            {
                tracing::debug!(dir = %dir.display(), error = %e, "directory kept");
            }
            Err(e) => return Err(io_err(dir)(e)),
        }
    }
    Ok(Removed { links, maps })
}

/// A map pinned by an agent whose values were smaller cannot be reused: the
/// programs read past their end, and the verifier refuses them. Its pin is
/// removed, so the load creates a fresh map.
///
/// - CONNTRACK (16 bytes before the policy epoch): established flows are
///   then judged as new flows on their next packet, once, as after a
///   policy epoch bump.
/// - POLICY (8 bytes before the ClusterNetworkPolicy tiers): until the
///   first programming pass writes the policies again, isolated endpoints
///   deny every new flow (fail closed; the old programs keep the old map
///   until their links are updated).
fn drop_outgrown(maps_dir: &Path, name: &'static str, want: usize) -> Result<()> {
    let pin = maps_dir.join(name);
    if !pin.exists() {
        return Ok(());
    }
    let info =
        aya::maps::MapInfo::from_pin(&pin).map_err(|source| DatapathError::Map { name, source })?;
    if usize::try_from(info.value_size()).is_ok_and(|v| v == want) {
        return Ok(());
    }
    tracing::warn!(
        map = name,
        pinned = info.value_size(),
        want,
        "pinned map of an older layout: replaced by an empty one"
    );
    std::fs::remove_file(&pin).map_err(|source| DatapathError::Io { path: pin, source })
}

/// The size of `name` as pinned under `maps_dir`, or `asked` when there is
/// no pin. A different pinned size is kept (and said): a map's size is
/// fixed when it is made, and its entries must survive a restart.
fn pinned_size(maps_dir: &Path, name: &'static str, asked: u32) -> Result<u32> {
    let pin = maps_dir.join(name);
    if !pin.exists() {
        return Ok(asked);
    }
    let info =
        aya::maps::MapInfo::from_pin(&pin).map_err(|source| DatapathError::Map { name, source })?;
    let pinned = info.max_entries();
    if pinned != asked {
        tracing::info!(
            map = name,
            pinned,
            asked,
            "a pinned map keeps the size it was made with (a fresh bpffs, e.g. after a reboot, takes the new one)"
        );
    }
    Ok(pinned)
}

/// Raises RLIMIT_MEMLOCK for kernels that still charge BPF memory to it.
/// On this kernel memory is cgroup-accounted and raising fails with EPERM,
/// which is harmless, so the result is deliberately ignored.
fn raise_memlock() {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid, initialised struct.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) };
    if rc != 0 {
        tracing::debug!("setrlimit(MEMLOCK) failed; memory is cgroup-accounted here");
    }
}
