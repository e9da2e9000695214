//! `bench cni`'s kernel floor: the TCX attaches of an ADD alone, on fresh
//! veths, as the agent makes them for a pod (BPF_LINK_CREATE on the
//! ingress and the egress hook of the host end), with a two-instruction
//! program and nothing else (no agent, no maps, no plugin). First one veth
//! after the other, then `n` veths at once from `n` threads released by a
//! barrier. If the kernel ran attaches to different devices concurrently,
//! a batch would take about one veth's time; `tcx_link_attach()` holds the
//! RTNL lock and waits for an RCU grace period inside it
//! (`tcx_entry_sync()`), so a batch takes about `n` times one veth's.
//!
//! Raw syscalls (libc) because aya's attach wants `&mut` of one program
//! and this measures threads attaching one program at once.
use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::Barrier,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use sluice_tests::{NetNs, TempDir};

use super::util as u;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
/// `enum bpf_attach_type` (include/uapi/linux/bpf.h).
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// The head of `union bpf_attr` for BPF_PROG_LOAD.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

/// The head of `union bpf_attr` for BPF_LINK_CREATE with TCX.
#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<OwnedFd> {
    let size = u32::try_from(size_of::<T>()).unwrap_or(u32::MAX);
    // SAFETY: `attr` is a valid `repr(C)` head of `union bpf_attr` of
    // `size` bytes; the kernel zero-extends the rest.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: the kernel just returned this fd, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `r0 = 0; exit` (TCX_PASS) as a sched_cls program.
fn load_pass_program() -> Result<OwnedFd> {
    // code, dst/src, off, imm: BPF_ALU64|BPF_MOV|BPF_K r0 = 0; BPF_JMP|BPF_EXIT.
    let insns: [[u8; 8]; 2] = [[0xb7, 0, 0, 0, 0, 0, 0, 0], [0x95, 0, 0, 0, 0, 0, 0, 0]];
    let license = c"GPL";
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..ProgLoad::default()
    };
    bpf(BPF_PROG_LOAD, &mut attr).context("BPF_PROG_LOAD of a pass program")
}

fn attach(prog: &OwnedFd, ifindex: u32, attach_type: u32) -> Result<OwnedFd> {
    let mut attr = LinkCreate {
        prog_fd: u32::try_from(prog.as_raw_fd())?,
        target_ifindex: ifindex,
        attach_type,
        ..LinkCreate::default()
    };
    bpf(BPF_LINK_CREATE, &mut attr).context("BPF_LINK_CREATE (TCX)")
}

/// A namespace holding `n` fresh veth pairs; the index of each first end.
fn veths(n: usize) -> Result<(NetNs, Vec<u32>)> {
    let ns = NetNs::new("sl-attach")?;
    let dir = TempDir::new("sluice-bench-attach-")?;
    let batch = dir.0.join("veths");
    let lines: String = (0..n)
        .map(|i| format!("link add va{i} type veth peer name vb{i}\n"))
        .collect();
    std::fs::write(&batch, lines)?;
    ns.ip(&["-batch", &batch.to_string_lossy()])?;
    let indexes = ns.run(move || {
        (0..n)
            .map(|i| {
                let name = std::ffi::CString::new(format!("va{i}"))?;
                // SAFETY: a valid NUL-terminated name.
                match unsafe { libc::if_nametoindex(name.as_ptr()) } {
                    0 => bail!("va{i} missing"),
                    idx => Ok(idx),
                }
            })
            .collect::<Result<Vec<u32>>>()
    })??;
    Ok((ns, indexes))
}

/// One veth's two hooks; the time of each attach in ms, and the links
/// (kept until the namespace goes: closing a link on a live device
/// detaches it, another grace period).
fn attach_both(prog: &OwnedFd, ifindex: u32) -> Result<([f64; 2], [OwnedFd; 2])> {
    let t0 = Instant::now();
    let from = attach(prog, ifindex, BPF_TCX_INGRESS)?;
    let t1 = Instant::now();
    let to = attach(prog, ifindex, BPF_TCX_EGRESS)?;
    let t2 = Instant::now();
    Ok(([u::ms(t1 - t0), u::ms(t2 - t1)], [from, to]))
}

/// The floor, over all rounds.
#[derive(Default)]
pub struct Floor {
    /// One hook's attach, veths one after the other.
    pub seq_hook: Vec<f64>,
    /// Per batch size: the batch's wall time per round, and each hook's
    /// attach in it.
    pub par: Vec<(usize, Vec<f64>, Vec<f64>)>,
}

/// `seq` veths one after the other, then each size in `par` at once.
pub fn measure(floor: &mut Floor, seq: usize, par: &[usize]) -> Result<()> {
    let prog = load_pass_program()?;
    {
        let (ns, idx) = veths(seq)?;
        let path = ns.path();
        let prog = prog.try_clone()?;
        type Links = Vec<[OwnedFd; 2]>;
        let (times, links) = std::thread::spawn(move || -> Result<(Vec<f64>, Links)> {
            sluice_tests::enter(&path)?;
            let mut out = Vec::new();
            let mut links = Vec::new();
            for i in idx {
                let (t, l) = attach_both(&prog, i)?;
                out.extend(t);
                links.push(l);
            }
            Ok((out, links))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("attach thread panicked"))??;
        drop(ns);
        drop(links);
        floor.seq_hook.extend(times);
    }
    for &n in par {
        let (ns, idx) = veths(n)?;
        let path = ns.path();
        let barrier = Barrier::new(n + 1);
        let (wall, each) = std::thread::scope(|s| -> Result<(f64, Vec<f64>)> {
            let handles: Vec<_> = idx
                .iter()
                .map(|&i| {
                    let (barrier, prog, path) = (&barrier, &prog, &path);
                    s.spawn(move || -> Result<([f64; 2], [OwnedFd; 2])> {
                        sluice_tests::enter(path)?;
                        barrier.wait();
                        attach_both(prog, i)
                    })
                })
                .collect();
            barrier.wait();
            let t0 = Instant::now();
            let mut each = Vec::new();
            let mut links = Vec::new();
            for h in handles {
                let (t, l) = h
                    .join()
                    .map_err(|_| anyhow::anyhow!("attach thread panicked"))??;
                each.extend(t);
                links.push(l);
            }
            let wall = u::ms(t0.elapsed());
            // The devices go first, then the links (defunct by then).
            drop(ns);
            drop(links);
            Ok((wall, each))
        })?;
        match floor.par.iter_mut().find(|(k, ..)| *k == n) {
            Some((_, walls, all)) => {
                walls.push(wall);
                all.extend(each);
            }
            None => floor.par.push((n, vec![wall], each)),
        }
    }
    Ok(())
}
