//! A private network namespace and bpffs per test, and the data path loaded
//! into them. BPF_PROG_TEST_RUN without a context runs the skb on the
//! loopback device of the calling thread's netns, ifindex 1: the endpoint
//! under test is ENDPOINTS[1] in a namespace that nothing else uses.
#![expect(
    clippy::expect_used,
    reason = "test helpers outside #[test] fns (clippy.toml covers only those): a panic is the failure report"
)]
use std::{
    ffi::CString,
    fs::File,
    os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, RingBuf, lpm_trie::Key},
    programs::{CgroupSkb, SchedClassifier, TestRun, TestRunOptions},
};
use sluice_common::{
    CidrKey, CidrValue, CounterKey, CtKey, CtValue, DIR_EGRESS, DropEvent, EndpointInfo,
    IpcacheKey, IpcacheValue, PolicyKey, PolicyValue, SERVICE_CLUSTER_IP, ServiceKey, maps,
    programs,
};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
/// The ifindex BPF_PROG_TEST_RUN reports: the netns's loopback.
pub const LOOPBACK: u32 = 1;
/// Offset of `mark` in `struct __sk_buff` (after `len` and `pkt_type`).
const SKB_MARK_OFF: usize = 8;
/// Longer than `struct __sk_buff` on any kernel this runs on.
const SKB_CTX_LEN: usize = 512;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace and a bpffs mount, both removed on drop (also when
/// the test panicked).
pub struct Sandbox {
    netns: String,
    bpffs: PathBuf,
    mounted: bool,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Sandbox {
    pub fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let mut sb = Self {
            netns: String::new(),
            bpffs: std::env::temp_dir().join(format!("sluice-dp-{pid}-{n}")),
            mounted: false,
        };
        std::fs::create_dir(&sb.bpffs).unwrap_or_else(|e| panic!("{}: {e}", sb.bpffs.display()));
        run(Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&sb.bpffs));
        sb.mounted = true;
        let name = format!("sluice-dp-{pid}-{n}");
        run(Command::new("ip").args(["netns", "add", &name]));
        sb.netns = name;
        sb
    }

    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// Moves the calling thread into the namespace.
    pub fn enter(&self) {
        let f = File::open(format!("/run/netns/{}", self.netns)).expect("open netns");
        // SAFETY: setns on a valid netns fd; it affects this thread only.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.mounted {
            let c = CString::new(self.bpffs.as_os_str().as_bytes()).expect("path");
            // SAFETY: umount of a path we mounted; MNT_DETACH so that a map
            // fd still open somewhere cannot keep it busy.
            let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            if rc != 0 {
                eprintln!(
                    "umount {}: {}",
                    self.bpffs.display(),
                    std::io::Error::last_os_error()
                );
            }
        }
        if let Err(e) = std::fs::remove_dir(&self.bpffs) {
            eprintln!("rmdir {}: {e}", self.bpffs.display());
        }
        if !self.netns.is_empty() {
            let st = Command::new("ip")
                .args(["netns", "del", &self.netns])
                .status();
            if !matches!(st, Ok(s) if s.success()) {
                eprintln!("ip netns del {}: {st:?}", self.netns);
            }
        }
    }
}

/// Runs `f` on a thread inside a fresh sandbox with the data path loaded.
/// The sandbox goes away afterwards whatever `f` did.
pub fn with_datapath<R: Send>(f: impl FnOnce(&mut Datapath) -> R + Send) -> R {
    with_datapath_sized(&[], f)
}

/// Like `with_datapath`, with some map sizes overridden.
pub fn with_datapath_sized<R: Send>(
    sizes: &[(&str, u32)],
    f: impl FnOnce(&mut Datapath) -> R + Send,
) -> R {
    let sandbox = Sandbox::new();
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            sandbox.enter();
            let mut dp = Datapath::load(sandbox.bpffs(), sizes);
            f(&mut dp)
        })
        .join()
    });
    drop(sandbox);
    match result {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

pub struct Datapath {
    pub ebpf: Ebpf,
    pub endpoints: HashMap<MapData, u32, EndpointInfo>,
    pub ep_by_id: HashMap<MapData, u32, u32>,
    pub services: HashMap<MapData, ServiceKey, u32>,
    pub ipcache: LpmTrie<MapData, IpcacheKey, IpcacheValue>,
    pub policy: HashMap<MapData, PolicyKey, PolicyValue>,
    pub cidrs: LpmTrie<MapData, CidrKey, CidrValue>,
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub drop_counters: PerCpuHashMap<MapData, CounterKey, sluice_common::CounterValue>,
    pub drop_events: RingBuf<MapData>,
    pub stats: PerCpuArray<MapData, u64>,
    pub epoch: Array<MapData, u32>,
    pub flow_events: Array<MapData, u32>,
}

fn take<T: TryFrom<aya::maps::Map>>(ebpf: &mut Ebpf, name: &str) -> T
where
    T::Error: std::fmt::Debug,
{
    let map = ebpf
        .take_map(name)
        .unwrap_or_else(|| panic!("no map {name}"));
    T::try_from(map).unwrap_or_else(|e| panic!("map {name}: {e:?}"))
}

impl Datapath {
    fn load(bpffs: &Path, sizes: &[(&str, u32)]) -> Self {
        raise_memlock();
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(bpffs);
        for (name, size) in sizes {
            loader.map_max_entries(name, *size);
        }
        // The production object, as the agent loads it: what ships is what
        // is tested (the bench-only programs are in EBPF_BENCH_OBJECT).
        let mut ebpf = loader
            .load(sluice_agent::datapath::EBPF_OBJECT)
            .unwrap_or_else(|e| panic!("loading the object: {e:?}"));
        for name in [programs::FROM_POD, programs::TO_POD] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("no program {name}"))
                .try_into()
                .unwrap_or_else(|e| panic!("{name}: {e:?}"));
            if let Err(e) = prog.load() {
                panic!("verifier rejected {name}: {e}");
            }
        }
        let host: &mut CgroupSkb = ebpf
            .program_mut(programs::TO_HOST)
            .expect("no program to_host")
            .try_into()
            .unwrap_or_else(|e| panic!("to_host: {e:?}"));
        if let Err(e) = host.load() {
            panic!("verifier rejected to_host: {e}");
        }
        Self {
            endpoints: take(&mut ebpf, maps::ENDPOINTS),
            ep_by_id: take(&mut ebpf, maps::EP_BY_ID),
            services: take(&mut ebpf, maps::SERVICES),
            ipcache: take(&mut ebpf, maps::IPCACHE),
            policy: take(&mut ebpf, maps::POLICY),
            cidrs: take(&mut ebpf, maps::CIDRS),
            conntrack: take(&mut ebpf, maps::CONNTRACK),
            drop_counters: take(&mut ebpf, maps::DROP_COUNTERS),
            drop_events: take(&mut ebpf, maps::DROP_EVENTS),
            stats: take(&mut ebpf, maps::STATS),
            epoch: take(&mut ebpf, maps::EPOCH),
            flow_events: take(&mut ebpf, maps::FLOW_EVENTS),
            ebpf,
        }
    }

    fn program(&self, name: &str) -> &SchedClassifier {
        self.ebpf
            .program(name)
            .unwrap_or_else(|| panic!("no program {name}"))
            .try_into()
            .unwrap_or_else(|e| panic!("{name}: {e:?}"))
    }

    /// Runs the program of direction `dir` on `frame`; its return value.
    pub fn run(&self, dir: u8, frame: &[u8]) -> u32 {
        self.run_repeat(dir, frame, 1)
    }

    pub fn run_repeat(&self, dir: u8, frame: &[u8], repeat: u32) -> u32 {
        match self.try_run(dir, frame, repeat) {
            Ok(v) => v,
            Err(e) => panic!("test_run dir {dir} on {} bytes: {e:?}", frame.len()),
        }
    }

    pub fn try_run(
        &self,
        dir: u8,
        frame: &[u8],
        repeat: u32,
    ) -> Result<u32, aya::programs::ProgramError> {
        let name = if dir == DIR_EGRESS {
            programs::FROM_POD
        } else {
            programs::TO_POD
        };
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::default()
        };
        self.program(name).test_run(opts).map(|r| r.return_value)
    }

    /// Runs `to_host` (cgroup skb: it sees `frame` from the IP header on)
    /// with `skb->mark` set to `mark`: 1 passes, 0 drops.
    pub fn run_host(&self, frame: &[u8], mark: u32) -> u32 {
        let mut ctx_in = [0u8; SKB_CTX_LEN];
        ctx_in[SKB_MARK_OFF..SKB_MARK_OFF + 4].copy_from_slice(&mark.to_ne_bytes());
        let opts = TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx_in),
            ..TestRunOptions::default()
        };
        let prog: &CgroupSkb = self
            .ebpf
            .program(programs::TO_HOST)
            .expect("no program to_host")
            .try_into()
            .unwrap_or_else(|e| panic!("to_host: {e:?}"));
        prog.test_run(opts)
            .unwrap_or_else(|e| panic!("test_run to_host with mark {mark:#x}: {e:?}"))
            .return_value
    }

    /// Runs the program of direction `dir` on `frame` with `skb->mark` set
    /// to `mark`: its return value and the mark it left.
    pub fn run_marked(&self, dir: u8, frame: &[u8], mark: u32) -> (u32, u32) {
        let name = if dir == DIR_EGRESS {
            programs::FROM_POD
        } else {
            programs::TO_POD
        };
        // A `struct __sk_buff` (the kernel accepts a longer buffer as long
        // as the excess is zero); only `mark` is set. ifindex 0: loopback.
        let mut ctx_in = [0u8; SKB_CTX_LEN];
        ctx_in[SKB_MARK_OFF..SKB_MARK_OFF + 4].copy_from_slice(&mark.to_ne_bytes());
        let mut ctx_out = [0u8; SKB_CTX_LEN];
        let opts = TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx_in),
            ctx_out: Some(&mut ctx_out),
            ..TestRunOptions::default()
        };
        let r = self
            .program(name)
            .test_run(opts)
            .unwrap_or_else(|e| panic!("test_run dir {dir} with mark {mark:#x}: {e:?}"));
        let mut out = [0u8; 4];
        out.copy_from_slice(&ctx_out[SKB_MARK_OFF..SKB_MARK_OFF + 4]);
        (r.return_value, u32::from_ne_bytes(out))
    }

    /// An endpoint that is not the loopback (a sender whose deferred egress
    /// `to_pod` judges): ENDPOINTS[ifindex] and EP_BY_ID[ep_id].
    pub fn set_endpoint_at(&mut self, ifindex: u32, ep: &EndpointInfo) {
        self.endpoints
            .insert(&ifindex, ep, 0)
            .expect("ENDPOINTS insert");
        self.ep_by_id
            .insert(&ep.ep_id, &ifindex, 0)
            .expect("EP_BY_ID insert");
    }

    /// An ipcache entry for one address of a local endpoint.
    pub fn set_ipcache_ep(&mut self, addr: [u8; 16], identity: u32, ep_id: u32) {
        let key = Key::new(128, IpcacheKey { addr });
        self.ipcache
            .insert(&key, &IpcacheValue { identity, ep_id }, 0)
            .expect("IPCACHE insert");
    }

    pub fn add_service(&mut self, addr: [u8; 16]) {
        self.services
            .insert(&ServiceKey { addr }, &SERVICE_CLUSTER_IP, 0)
            .expect("SERVICES insert");
    }

    pub fn passes(&self, dir: u8, frame: &[u8]) -> bool {
        match self.run(dir, frame) {
            TC_ACT_OK => true,
            TC_ACT_SHOT => false,
            other => panic!("unexpected verdict {other}"),
        }
    }

    pub fn set_endpoint(&mut self, ep: &EndpointInfo) {
        self.endpoints
            .insert(&LOOPBACK, ep, 0)
            .expect("ENDPOINTS insert");
    }

    pub fn set_ipcache(&mut self, addr: [u8; 16], plen: u32, identity: u32) {
        let key = Key::new(plen, IpcacheKey { addr });
        let value = IpcacheValue { identity, ep_id: 0 };
        self.ipcache
            .insert(&key, &value, 0)
            .expect("IPCACHE insert");
    }

    pub fn set_cidr(&mut self, ep_id: u32, dir: u8, addr: [u8; 16], plen: u32, group: u32) {
        let key = Key::new(
            sluice_common::CIDR_KEY_FIXED_BITS + plen,
            CidrKey {
                ep_id,
                dir,
                _pad: [0; 3],
                addr,
            },
        );
        self.cidrs
            .insert(&key, &CidrValue { group }, 0)
            .expect("CIDRS insert");
    }

    pub fn allow(&mut self, key: PolicyKey, rule_id: u32) {
        let value = PolicyValue {
            flags: sluice_common::POLICY_ALLOW,
            rule_id,
            ..PolicyValue::default()
        };
        self.policy.insert(&key, &value, 0).expect("POLICY insert");
    }

    /// Writes a policy value as it is (tiers included).
    pub fn set_policy(&mut self, key: PolicyKey, value: PolicyValue) {
        self.policy.insert(&key, &value, 0).expect("POLICY insert");
    }

    /// Sum over CPUs of a drop counter: (packets, bytes).
    pub fn drops(&self, ep_id: u32, reason: u8, dir: u8) -> (u64, u64) {
        let key = CounterKey {
            ep_id,
            reason,
            dir,
            _pad: 0,
        };
        match self.drop_counters.get(&key, 0) {
            Ok(per_cpu) => per_cpu
                .iter()
                .fold((0, 0), |(p, b), v| (p + v.packets, b + v.bytes)),
            Err(aya::maps::MapError::KeyNotFound) => (0, 0),
            Err(e) => panic!("DROP_COUNTERS: {e:?}"),
        }
    }

    /// What the agent does after a programming pass: the next policy
    /// epoch. Returns it.
    pub fn bump_epoch(&mut self) -> u32 {
        let index = sluice_common::EPOCH_INDEX;
        let next = self.epoch.get(&index, 0).expect("EPOCH") + 1;
        self.epoch.set(index, &next, 0).expect("EPOCH set");
        next
    }

    /// Turns the per-flow event switch (`FLOW_EVENTS`) on or off.
    pub fn set_flow_events(&mut self, on: bool) {
        self.flow_events
            .set(sluice_common::FLOW_EVENTS_INDEX, &u32::from(on), 0)
            .expect("FLOW_EVENTS set");
    }

    pub fn stat(&self, index: u32) -> u64 {
        self.stats.get(&index, 0).expect("STATS").iter().sum()
    }

    /// Drains the ring buffer.
    pub fn events(&mut self) -> Vec<DropEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.drop_events.next() {
            assert_eq!(item.len(), std::mem::size_of::<DropEvent>(), "event size");
            // SAFETY: the buffer holds exactly one DropEvent, a Pod.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<DropEvent>()) });
        }
        out
    }

    pub fn ct(&self, key: &CtKey) -> Option<CtValue> {
        match self.conntrack.get(key, 0) {
            Ok(v) => Some(v),
            Err(aya::maps::MapError::KeyNotFound) => None,
            Err(e) => panic!("CONNTRACK: {e:?}"),
        }
    }
}

/// setrlimit(MEMLOCK) fails with EPERM on these machines (memory is
/// cgroup-accounted anyway); nothing to do then.
fn raise_memlock() {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid struct.
    let _eperm_is_fine = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) };
}
