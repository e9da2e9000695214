//! Attaching the programs: TC hooks on pod veths and uplinks (TCX links
//! pinned under `links/`, or clsact filters at a fixed priority and handle
//! on kernels without TCX) and `to_host` on the node's cgroup. Pinned links
//! keep the programs attached while the agent is down; a new agent swaps its
//! programs into the same links atomically.
use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, LinkOrder, ProgramError, SchedClassifier,
        TcAttach, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcHandle},
    },
    util::KernelVersion,
};
use sluice_common::{not_found_ok, programs};

use super::{DatapathError, Result};

/// The loaded programs and where their links are pinned, behind a lock
/// of their own: an attach waits in the kernel (TCX: an RCU grace period
/// per hook, under the RTNL lock), and the agent's state lock is not held
/// meanwhile (`reconcile::Reconciler::add_endpoint`). Cloning shares them.
#[derive(Clone)]
pub struct Programs {
    loaded: Arc<Mutex<Loaded>>,
    pin_dir: PathBuf,
}

pub(super) struct Loaded {
    pub(super) ebpf: Ebpf,
    pub(super) pin_dir: PathBuf,
    pub(super) mode: AttachMode,
}

impl Programs {
    pub(super) fn new(loaded: Loaded) -> Self {
        Self {
            pin_dir: loaded.pin_dir.clone(),
            loaded: Arc::new(Mutex::new(loaded)),
        }
    }

    /// A panic while attaching leaves nothing half-written in `Loaded`
    /// (the kernel owns the links; the pins are files), so a poisoned
    /// lock is taken over as is.
    fn lock(&self) -> MutexGuard<'_, Loaded> {
        self.loaded.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Attaches both programs to the host end `ifname`: with TCX, pinning the
    /// links; with clsact (kernels without TCX), as direct-action filters at a
    /// fixed priority and handle, marked by a directory in bpffs. When an
    /// earlier agent attached them, the current programs replace the old
    /// ones in place (BPF_LINK_UPDATE, or a netlink filter replace),
    /// atomically: the interface is never without a program.
    pub fn attach(&self, ifname: &str) -> Result<()> {
        self.attach_timed(ifname).1
    }

    /// [`Self::attach`], and how long it waited for another attach to end.
    pub fn attach_timed(&self, ifname: &str) -> (Duration, Result<()>) {
        let asked = Instant::now();
        let mut loaded = self.lock();
        let waited = asked.elapsed();
        (waited, loaded.attach_hooks(ifname, &HOOKS))
    }

    /// Attaches `to_uplink` to an interface towards other nodes (pinned
    /// like the pod hooks; attaching again swaps the program in place).
    pub fn attach_uplink(&self, ifname: &str) -> Result<()> {
        self.lock().attach_hooks(ifname, &UPLINK_HOOKS)
    }

    /// Detaches `to_uplink` from an interface no route leaves by any more.
    pub fn detach_uplink(&self, ifname: &str) -> Result<()> {
        detach_hooks(&self.pin_dir, ifname, &UPLINK_HOOKS)
    }

    /// See [`Loaded::attach_host`].
    pub fn attach_host(&self, cgroup: &Path) -> Result<()> {
        self.lock().attach_host(cgroup)
    }

    /// True when both hooks of `ifname` are attached (pinned TCX links or
    /// clsact markers).
    pub fn is_attached(&self, ifname: &str) -> bool {
        HOOKS.iter().all(|h| {
            let p = link_path(&self.pin_dir, ifname, *h);
            p.exists() || clsact_marker(&p).exists()
        })
    }

    /// Unpins the links of `ifname`. The kernel detaches a TCX link when its
    /// last reference goes, and a link whose interface is gone is already
    /// defunct: both are fine, and a missing pin is not an error. Files
    /// and netlink only: no need to wait for an attach in progress.
    pub fn detach(&self, ifname: &str) -> Result<()> {
        detach_hooks(&self.pin_dir, ifname, &HOOKS)
    }
}

fn link_path(pin_dir: &Path, ifname: &str, hook: Hook) -> PathBuf {
    pin_dir
        .join("links")
        .join(format!("{ifname}-{}", hook.suffix))
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// TCX where the kernel has it (>= 6.6), clsact otherwise.
    Auto,
    Tcx,
    Clsact,
}

/// TCX arrived in Linux 6.6.
pub(super) fn has_tcx() -> bool {
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

impl Loaded {
    fn link_path(&self, ifname: &str, hook: Hook) -> PathBuf {
        link_path(&self.pin_dir, ifname, hook)
    }

    pub(super) fn set_attach_mode(&mut self, mode: AttachMode) {
        self.mode = match mode {
            AttachMode::Auto if has_tcx() => AttachMode::Tcx,
            AttachMode::Auto => AttachMode::Clsact,
            m => m,
        };
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
    fn attach_host(&mut self, cgroup: &Path) -> Result<()> {
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
        let remove = |path: &Path| {
            not_found_ok(std::fs::remove_file(path))
                .map(drop)
                .map_err(io_err(path))
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
}

fn detach_hooks(pin_dir: &Path, ifname: &str, hooks: &[Hook]) -> Result<()> {
    for &hook in hooks {
        let path = link_path(pin_dir, ifname, hook);
        let marker = clsact_marker(&path);
        if marker.exists() {
            remove_clsact(ifname, hook.attach_type, marker)?;
        }
        if let Err(source) = not_found_ok(std::fs::remove_file(&path)) {
            return Err(DatapathError::Io { path, source });
        }
    }
    Ok(())
}

/// Removes Sluice's clsact filter of one hook if the interface is still
/// there (with the interface gone, so is the filter), then its marker.
fn remove_clsact(ifname: &str, attach_type: TcAttachType, marker: PathBuf) -> Result<()> {
    if let Ok(c) = std::ffi::CString::new(ifname)
        && let Ok(link) = SchedClassifierLink::attached(
            c.as_c_str(),
            TcHandle::from(attach_type),
            CLSACT_PRIORITY,
            CLSACT_HANDLE,
            None,
        )
        && let Err(e) = aya::programs::links::Link::detach(link)
    {
        tracing::debug!(%ifname, error = %e, "clsact filter already gone");
    }
    std::fs::remove_dir(&marker).map_err(|source| DatapathError::Io {
        path: marker,
        source,
    })
}

/// What `remove_link_pins` took away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemovedLinks {
    /// Pinned links (TCX and the cgroup's `to_host`): the pin was each
    /// one's last reference once the agent is stopped, so the kernel
    /// detaches it.
    pub links: usize,
    /// clsact filters (kernels without TCX), removed by netlink.
    pub filters: usize,
}

/// Detaches everything pinned or marked under `links_dir` (uninstall):
/// pinned links are unpinned, clsact filters removed from their interface.
/// Nothing else on an interface is touched.
pub fn remove_link_pins(links_dir: &Path) -> Result<RemovedLinks> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| DatapathError::Io { path, source }
    };
    let mut out = RemovedLinks::default();
    let entries = match std::fs::read_dir(links_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(links_dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(links_dir))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(hook_name) = name.strip_suffix("-clsact") {
            // `<ifname>-<from|to|uplink>-clsact`
            let hook = hook_name.rsplit_once('-').and_then(|(ifname, suffix)| {
                HOOKS
                    .iter()
                    .chain(&UPLINK_HOOKS)
                    .find(|h| h.suffix == suffix)
                    .map(|h| (ifname, h.attach_type))
            });
            match hook {
                Some((ifname, attach_type)) => remove_clsact(ifname, attach_type, path)?,
                None => std::fs::remove_dir(&path).map_err(io_err(&path))?,
            }
            out.filters += 1;
        } else {
            not_found_ok(std::fs::remove_file(&path)).map_err(io_err(&path))?;
            out.links += 1;
        }
    }
    Ok(out)
}

/// Program `name` of the object, as its type (`SchedClassifier`, `CgroupSkb`).
pub(super) fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}
