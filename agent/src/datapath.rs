//! Loading, pinning and attaching the TC programs, and typed access to their
//! maps. Everything here is a thin edge over aya; what to write is decided
//! by the pure modules (`l4`, and later the policy compiler).
//!
//! bpffs layout under the pin directory:
//!   maps/<NAME>            every map, pinned by name (reused on restart)
//!   links/<ifname>-from    TCX link of `from_pod` (ingress hook of the host veth)
//!   links/<ifname>-to      TCX link of `to_pod`   (egress hook of the host veth)
//!   links/<ifname>-{from,to}-clsact   a directory marking a clsact filter
//!   links/cgroup-to_host-{a,b}   cgroup link of `to_host` (ingress of the node's sockets)
//! Pinned links keep the programs attached while the agent is down; a new
//! agent swaps its programs into the same links atomically. Without TCX the
//! hooks are clsact filters at a fixed priority and handle, replaced the
//! same way by a netlink filter replace.
use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf,
        lpm_trie::Key,
    },
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, LinkOrder, ProgramError, SchedClassifier,
        TcAttach, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcHandle},
    },
    util::KernelVersion,
};
use sluice_common::{
    CidrKey, CidrValue, CounterKey, CounterValue, CtKey, CtValue, EndpointInfo, IpcacheKey,
    IpcacheValue, PolicyKey, PolicyValue, ServiceKey, maps, programs,
};

/// The TC programs, built by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-tc"));
/// The same programs plus the bench-only ones (`noop`, `bench_*`; sluice-ebpf's
/// `bench` feature), for `cargo xtask bench datapath`. The agent never loads
/// it; tests/tests/ebpf_object.rs checks which programs each object has.
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
        source: io::Error,
    },
}

pub type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// Map sizes chosen at load time. An existing pinned map keeps its size.
#[derive(Clone, Debug)]
pub struct Sizes {
    pub conntrack: u32,
    pub policy: u32,
    pub endpoints: u32,
    pub ipcache: u32,
    pub cidrs: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        use sluice_common::sizes;
        Self {
            conntrack: sizes::CONNTRACK,
            policy: sizes::POLICY,
            endpoints: sizes::ENDPOINTS,
            ipcache: sizes::IPCACHE,
            cidrs: sizes::CIDRS,
        }
    }
}

/// Typed handles on every map of the data path.
pub struct Maps {
    pub endpoints: HashMap<MapData, u32, EndpointInfo>,
    /// Endpoint id -> host ifindex (its ENDPOINTS key), kept in step with
    /// ENDPOINTS.
    pub ep_by_id: HashMap<MapData, u32, u32>,
    /// Service addresses (ClusterIPs) -> `SERVICE_*` flags.
    pub services: HashMap<MapData, ServiceKey, u32>,
    pub ipcache: LpmTrie<MapData, IpcacheKey, IpcacheValue>,
    pub policy: HashMap<MapData, PolicyKey, PolicyValue>,
    pub cidrs: LpmTrie<MapData, CidrKey, CidrValue>,
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub drop_counters: PerCpuHashMap<MapData, CounterKey, CounterValue>,
    pub stats: PerCpuArray<MapData, u64>,
}

fn typed<T: TryFrom<Map, Error = MapError>>(name: &'static str, map: Map) -> Result<T> {
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

impl Maps {
    fn from_source(mut get: impl FnMut(&'static str) -> Result<Map>) -> Result<Self> {
        Ok(Self {
            endpoints: typed(maps::ENDPOINTS, get(maps::ENDPOINTS)?)?,
            ep_by_id: typed(maps::EP_BY_ID, get(maps::EP_BY_ID)?)?,
            services: typed(maps::SERVICES, get(maps::SERVICES)?)?,
            ipcache: typed(maps::IPCACHE, get(maps::IPCACHE)?)?,
            policy: typed(maps::POLICY, get(maps::POLICY)?)?,
            cidrs: typed(maps::CIDRS, get(maps::CIDRS)?)?,
            conntrack: typed(maps::CONNTRACK, get(maps::CONNTRACK)?)?,
            drop_counters: typed(maps::DROP_COUNTERS, get(maps::DROP_COUNTERS)?)?,
            stats: typed(maps::STATS, get(maps::STATS)?)?,
        })
    }

    /// Opens the maps a running (or stopped) agent pinned under `pin_dir`.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        let dir = pin_dir.join("maps");
        Self::from_source(|name| open_pinned_map(&dir, name))
    }

    /// Sum of the per-CPU drop counters, by key.
    pub fn drop_counters(&self) -> Result<Vec<(CounterKey, CounterValue)>> {
        let mut out = Vec::new();
        for item in self.drop_counters.iter() {
            let (k, per_cpu) = item.map_err(|source| DatapathError::Map {
                name: maps::DROP_COUNTERS,
                source,
            })?;
            let mut sum = CounterValue::default();
            for v in per_cpu.iter() {
                sum.packets += v.packets;
                sum.bytes += v.bytes;
            }
            out.push((k, sum));
        }
        out.sort_by_key(|(k, _)| (k.ep_id, k.dir, k.reason));
        Ok(out)
    }

    /// Sum over CPUs of one `sluice_common::stat` counter.
    pub fn stat(&self, index: u32) -> Result<u64> {
        let v = self
            .stats
            .get(&index, 0)
            .map_err(|source| DatapathError::Map {
                name: maps::STATS,
                source,
            })?;
        Ok(v.iter().sum())
    }
}

fn open_pinned_map(dir: &Path, name: &'static str) -> Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|source| DatapathError::Map { name, source })?;
    Map::from_map_data(data).map_err(|source| DatapathError::Map { name, source })
}

/// The loaded programs plus their maps.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    pub maps: Maps,
    /// The sizes asked for at load (a reused pinned map keeps its own).
    pub sizes: Sizes,
    mode: AttachMode,
    events: Option<RingBuf<MapData>>,
}

/// One hook of a pod interface.
#[derive(Clone, Copy, Debug)]
struct Hook {
    program: &'static str,
    attach_type: TcAttachType,
    suffix: &'static str,
}

const HOOKS: [Hook; 2] = [
    Hook {
        program: programs::FROM_POD,
        attach_type: TcAttachType::Ingress,
        suffix: "from",
    },
    Hook {
        program: programs::TO_POD,
        attach_type: TcAttachType::Egress,
        suffix: "to",
    },
];

/// How the programs are attached to interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// TCX where the kernel has it (>= 6.6), clsact otherwise.
    Auto,
    Tcx,
    Clsact,
}

impl std::str::FromStr for AttachMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "tcx" => Ok(Self::Tcx),
            "clsact" => Ok(Self::Clsact),
            other => Err(format!("{other}: auto, tcx or clsact")),
        }
    }
}

/// TCX arrived in Linux 6.6.
fn has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// Where Sluice's clsact filters sit: a fixed priority and handle, so a
/// restarted agent finds and replaces them without having to remember.
const CLSACT_PRIORITY: u16 = 0x5c1;
const CLSACT_HANDLE: TcHandle = TcHandle::new(0, 0x5c1);

/// The bpffs directory that marks a clsact filter (bpffs holds no regular
/// files, but it holds directories; names may not contain a dot).
fn clsact_marker(link_path: &Path) -> PathBuf {
    let mut s = link_path.as_os_str().to_owned();
    s.push("-clsact");
    PathBuf::from(s)
}

/// The hook of an uplink (an interface towards other nodes).
const UPLINK_HOOKS: [Hook; 1] = [Hook {
    program: programs::TO_UPLINK,
    attach_type: TcAttachType::Egress,
    suffix: "uplink",
}];

impl Datapath {
    /// Loads the programs, reusing every map already pinned under
    /// `pin_dir/maps` (so a restart loses no state) and pinning new ones.
    /// `pin_dir` must be on a bpffs.
    pub fn load(pin_dir: &Path, sizes: &Sizes) -> Result<Self> {
        for sub in ["maps", "links"] {
            let p = pin_dir.join(sub);
            std::fs::create_dir_all(&p).map_err(|source| DatapathError::Io { path: p, source })?;
        }
        raise_memlock();
        let maps_dir = pin_dir.join("maps");
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .map_max_entries(maps::CONNTRACK, sizes.conntrack)
            .map_max_entries(maps::POLICY, sizes.policy)
            .map_max_entries(maps::ENDPOINTS, sizes.endpoints)
            .map_max_entries(maps::EP_BY_ID, sizes.endpoints)
            .map_max_entries(maps::IPCACHE, sizes.ipcache)
            .map_max_entries(maps::CIDRS, sizes.cidrs)
            .load(EBPF_OBJECT)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        for hook in HOOKS.iter().chain(&UPLINK_HOOKS) {
            program_mut::<SchedClassifier>(&mut ebpf, hook.program)?
                .load()
                .map_err(|source| DatapathError::Program {
                    name: hook.program,
                    source,
                })?;
        }
        program_mut::<CgroupSkb>(&mut ebpf, programs::TO_HOST)?
            .load()
            .map_err(|source| DatapathError::Program {
                name: programs::TO_HOST,
                source,
            })?;
        let maps =
            Maps::from_source(|name| ebpf.take_map(name).ok_or(DatapathError::MissingMap(name)))?;
        let events = ebpf
            .take_map(maps::DROP_EVENTS)
            .ok_or(DatapathError::MissingMap(maps::DROP_EVENTS))
            .and_then(|m| typed(maps::DROP_EVENTS, m))?;
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            maps,
            sizes: sizes.clone(),
            mode: if has_tcx() {
                AttachMode::Tcx
            } else {
                AttachMode::Clsact
            },
            events: Some(events),
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The drop-event ring buffer; only one reader may take it.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    fn link_path(&self, ifname: &str, hook: Hook) -> PathBuf {
        self.pin_dir
            .join("links")
            .join(format!("{ifname}-{}", hook.suffix))
    }

    /// How programs are attached from now on.
    pub fn set_attach_mode(&mut self, mode: AttachMode) {
        self.mode = match mode {
            AttachMode::Auto if has_tcx() => AttachMode::Tcx,
            AttachMode::Auto => AttachMode::Clsact,
            m => m,
        };
    }

    /// Attaches both programs to the host end `ifname`: with TCX, pinning the
    /// links; with clsact (kernels without TCX), as direct-action filters at a
    /// fixed priority and handle, marked by a directory in bpffs. When an
    /// earlier agent attached them, the current programs replace the old
    /// ones in place (BPF_LINK_UPDATE, or a netlink filter replace),
    /// atomically: the interface is never without a program.
    pub fn attach(&mut self, ifname: &str) -> Result<()> {
        self.attach_hooks(ifname, &HOOKS)
    }

    /// Attaches `to_uplink` to an interface towards other nodes (pinned
    /// like the pod hooks; attaching again swaps the program in place).
    pub fn attach_uplink(&mut self, ifname: &str) -> Result<()> {
        self.attach_hooks(ifname, &UPLINK_HOOKS)
    }

    fn attach_hooks(&mut self, ifname: &str, hooks: &[Hook]) -> Result<()> {
        let c_ifname = std::ffi::CString::new(ifname).map_err(|e| DatapathError::Io {
            path: PathBuf::from(ifname),
            source: io::Error::new(io::ErrorKind::InvalidInput, e),
        })?;
        if self.mode == AttachMode::Clsact {
            return self.attach_clsact(&c_ifname, ifname, hooks);
        }
        for &hook in hooks {
            let path = self.link_path(ifname, hook);
            let prog: &mut SchedClassifier = program_mut(&mut self.ebpf, hook.program)?;
            let prog_err = |source| DatapathError::Program {
                name: hook.program,
                source,
            };
            let link_id = match PinnedLink::from_pin(&path) {
                Ok(old) => {
                    let link =
                        SchedClassifierLink::try_from(FdLink::from(old)).map_err(|source| {
                            DatapathError::Link {
                                path: path.clone(),
                                source,
                            }
                        })?;
                    // The pin stays and now runs this program. Dropping our
                    // handle only closes an fd; the pin keeps the link.
                    let id = prog.attach_to_link(link).map_err(prog_err)?;
                    drop(prog.take_link(id).map_err(prog_err)?);
                    continue;
                }
                Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {
                    prog.attach(
                        c_ifname.as_c_str(),
                        TcAttach::Tcx {
                            attach_type: hook.attach_type,
                            order: LinkOrder::default(),
                        },
                    )
                    .map_err(prog_err)?
                }
                Err(source) => return Err(DatapathError::Link { path, source }),
            };
            let link = prog.take_link(link_id).map_err(prog_err)?;
            let fd_link = FdLink::try_from(link).map_err(|source| DatapathError::Link {
                path: path.clone(),
                source,
            })?;
            fd_link
                .pin(&path)
                .map_err(|source| DatapathError::Pin { path, source })?;
        }
        Ok(())
    }

    fn attach_clsact(
        &mut self,
        c_ifname: &std::ffi::CStr,
        ifname: &str,
        hooks: &[Hook],
    ) -> Result<()> {
        match tc::qdisc_add_clsact(c_ifname) {
            Ok(()) | Err(tc::TcError::AlreadyAttached) => {}
            Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(DatapathError::Program {
                    name: "clsact qdisc",
                    source: ProgramError::from(e),
                });
            }
        }
        for &hook in hooks {
            let marker = clsact_marker(&self.link_path(ifname, hook));
            let prog: &mut SchedClassifier = program_mut(&mut self.ebpf, hook.program)?;
            let prog_err = |source| DatapathError::Program {
                name: hook.program,
                source,
            };
            let parent = TcHandle::from(hook.attach_type);
            let id = if marker.exists() {
                // Our filter is there: replace its program in place.
                let old = SchedClassifierLink::attached(
                    c_ifname,
                    parent,
                    CLSACT_PRIORITY,
                    CLSACT_HANDLE,
                    None,
                )
                .map_err(|source| DatapathError::Io {
                    path: marker.clone(),
                    source,
                })?;
                prog.attach_to_link(old).map_err(prog_err)?
            } else {
                let options = NlOptions {
                    priority: CLSACT_PRIORITY,
                    handle: CLSACT_HANDLE,
                    classid: None,
                };
                prog.attach(c_ifname, TcAttach::Netlink { parent, options })
                    .map_err(prog_err)?
            };
            // The filter must outlive this process, like a pinned link:
            // dropping the handle would detach it.
            std::mem::forget(prog.take_link(id).map_err(prog_err)?);
            match std::fs::create_dir(&marker) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(DatapathError::Io {
                        path: marker,
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Attaches `to_host` to the cgroup v2 directory `cgroup`: packets
    /// delivered to the sockets of its processes pass through it. The link
    /// is pinned (links/cgroup-to_host) and outlives the agent. A new agent
    /// attaches its own program first and only then detaches the previous
    /// one, so the node is never without it (for a moment both run; they
    /// judge alike).
    pub fn attach_host(&mut self, cgroup: &Path) -> Result<()> {
        // Two pin names, used in turn (bpffs cannot rename a pin over
        // another): ours goes where the previous agent's is not.
        let links = self.pin_dir.join("links");
        let (a, b) = (
            links.join("cgroup-to_host-a"),
            links.join("cgroup-to_host-b"),
        );
        let (ours, previous) = if a.exists() { (b, a) } else { (a, b) };
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| DatapathError::Io { path, source }
        };
        let remove = |path: &Path| match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(path)(e)),
        };
        let dir = std::fs::File::open(cgroup).map_err(io_err(cgroup))?;
        let prog: &mut CgroupSkb = program_mut(&mut self.ebpf, programs::TO_HOST)?;
        let prog_err = |source| DatapathError::Program {
            name: programs::TO_HOST,
            source,
        };
        let id = prog
            .attach(
                &dir,
                CgroupSkbAttachType::Ingress,
                // As a link it runs beside other programs of the cgroup
                // (the kernel refuses flags on cgroup links).
                CgroupAttachMode::Single,
            )
            .map_err(prog_err)?;
        let link = FdLink::try_from(prog.take_link(id).map_err(prog_err)?).map_err(|source| {
            DatapathError::Link {
                path: ours.clone(),
                source,
            }
        })?;
        // A stale pin of ours (an agent that stopped between pinning and
        // removing) goes first: the previous one still runs meanwhile.
        remove(&ours)?;
        link.pin(&ours).map_err(|source| DatapathError::Pin {
            path: ours.clone(),
            source,
        })?;
        // The previous agent's pin was that link's last reference: the
        // kernel detaches its program.
        remove(&previous)
    }

    /// True when both hooks of `ifname` are attached (pinned TCX links or
    /// clsact markers).
    pub fn is_attached(&self, ifname: &str) -> bool {
        HOOKS.iter().all(|h| {
            let p = self.link_path(ifname, *h);
            p.exists() || clsact_marker(&p).exists()
        })
    }

    /// Unpins the links of `ifname`. The kernel detaches a TCX link when its
    /// last reference goes, and a link whose interface is gone is already
    /// defunct: both are fine, and a missing pin is not an error.
    pub fn detach(&mut self, ifname: &str) -> Result<()> {
        for hook in HOOKS {
            let path = self.link_path(ifname, hook);
            let marker = clsact_marker(&path);
            if marker.exists() {
                // A clsact filter: remove it if the interface is still
                // there (with the interface gone, so is the filter).
                if let Ok(c) = std::ffi::CString::new(ifname)
                    && let Ok(link) = SchedClassifierLink::attached(
                        c.as_c_str(),
                        TcHandle::from(hook.attach_type),
                        CLSACT_PRIORITY,
                        CLSACT_HANDLE,
                        None,
                    )
                    && let Err(e) = aya::programs::links::Link::detach(link)
                {
                    tracing::debug!(%ifname, error = %e, "clsact filter already gone");
                }
                if let Err(source) = std::fs::remove_dir(&marker) {
                    return Err(DatapathError::Io {
                        path: marker,
                        source,
                    });
                }
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(DatapathError::Io { path, source }),
            }
        }
        Ok(())
    }

    /// Names of interfaces with pinned links (for reconciling at start-up).
    pub fn attached_interfaces(&self) -> Result<Vec<String>> {
        let dir = self.pin_dir.join("links");
        let rd = std::fs::read_dir(&dir).map_err(|source| DatapathError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut out: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.strip_suffix("-from").map(str::to_owned)
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// A loaded program, e.g. for BPF_PROG_TEST_RUN in tests and benches.
    pub fn program(&self, name: &'static str) -> Result<&SchedClassifier> {
        self.ebpf
            .program(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })
    }
}

/// Program `name` of the object, as its type (`SchedClassifier`, `CgroupSkb`).
fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
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

/// Key of a Service address in SERVICES.
pub fn service_key(ip: std::net::IpAddr) -> ServiceKey {
    let (addr, _) = mapped(ip.into());
    ServiceKey { addr }
}

/// LPM key of an address in the ipcache.
pub fn ipcache_key(net: ipnetwork::IpNetwork) -> Key<IpcacheKey> {
    let (addr, plen) = mapped(net);
    Key::new(plen, IpcacheKey { addr })
}

/// LPM key of a prefix in an endpoint's CIDR map.
pub fn cidr_key(ep_id: u32, dir: u8, net: ipnetwork::IpNetwork) -> Key<CidrKey> {
    let (addr, plen) = mapped(net);
    Key::new(
        sluice_common::CIDR_KEY_FIXED_BITS + plen,
        CidrKey {
            ep_id,
            dir,
            _pad: [0; 3],
            addr,
        },
    )
}

/// 16-byte (IPv4-mapped) form of a prefix, with its length in that form.
pub fn mapped(net: ipnetwork::IpNetwork) -> ([u8; 16], u32) {
    match net {
        ipnetwork::IpNetwork::V4(n) => (
            sluice_common::v4_mapped(n.network().octets()),
            sluice_common::V4_MAPPED_PLEN_OFFSET + u32::from(n.prefix()),
        ),
        ipnetwork::IpNetwork::V6(n) => (n.network().octets(), u32::from(n.prefix())),
    }
}
