//! The whole policy pipeline of one node, without the cluster: the agent's
//! compiler (`sluice_agent::policy::Compiler`, every pod local), the agent's
//! own map writer (`datapath::Writer`: ipcache, endpoint records, gap-free
//! policy replace) on maps pinned in a private bpffs, and the real
//! `from_pod`/`to_pod` programs run on crafted frames through
//! BPF_PROG_TEST_RUN. What [`crate::differential`] compares with the oracle.
//!
//! BPF_PROG_TEST_RUN runs a TC program on the loopback of the calling
//! thread's netns (ifindex 1), so each endpoint gets a made-up ifindex for
//! its record and a probe copies that record to ENDPOINTS[1] before it runs
//! the program of that endpoint. Everything here must run on a thread
//! inside the sandbox's netns ([`crate::enter`]).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use sluice_agent::{
    datapath::{AttachMode, Datapath, EndpointRecord, Sizes},
    model::{EpId, Identity},
    policy::{Changes, Compiled, Compiler, Locality, ObjectRef, Resync},
};
use sluice_common::{EndpointInfo, IDENTITY_HOST, PROFILE_KEY_FLAG, maps, programs, proto};

use crate::oracle::{Proto, World};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
/// The loopback: where BPF_PROG_TEST_RUN runs the programs.
const LOOPBACK: u32 = 1;
/// Made-up ifindexes of the endpoints start here.
const FIRST_IFINDEX: u32 = 1000;

/// Small maps: the pipeline holds a few dozen endpoints, and hash maps are
/// preallocated, so the defaults would cost each load hundreds of MB.
fn sizes() -> Sizes {
    Sizes {
        conntrack: 65_536,
        policy: 65_536,
        endpoints: 1024,
        ipcache: 4096,
        cidrs: 4096,
        peer_classes: 4096,
    }
}

struct Wired {
    record: EndpointRecord,
    programmed: Compiled,
}

pub struct Pipeline {
    pub compiler: Compiler,
    dp: Datapath,
    progs: Ebpf,
    endpoints_map: HashMap<MapData, u32, EndpointInfo>,
    wired: BTreeMap<ObjectRef, Wired>,
    /// ClusterNetworkPolicy profile -> its entries as written.
    profiles: BTreeMap<u32, Compiled>,
    next_ep: u32,
    next_sport: u16,
    world: World,
}

impl Pipeline {
    /// Loads the data path under `pin_dir` (a fresh directory on a bpffs)
    /// and programs `world` as an agent's first full list would.
    pub fn new(pin_dir: &Path, world: &World) -> Result<Self> {
        let (mut dp, _events) = Datapath::load(pin_dir, &sizes(), AttachMode::Auto)
            .map_err(|e| anyhow!("loading the data path: {e}"))?;
        for ip in &world.node_ips {
            dp.writer
                .set_ipcache(*ip, Identity(IDENTITY_HOST), None)
                .map_err(|e| anyhow!("node address: {e}"))?;
        }
        // The same object again, on the same pinned maps: these programs
        // are the ones run; the agent's copy keeps its own handles.
        let s = sizes();
        let mut progs = EbpfLoader::new()
            .default_map_pin_directory(pin_dir.join("maps"))
            .map_max_entries(maps::CONNTRACK, s.conntrack)
            .map_max_entries(maps::POLICY, s.policy)
            .map_max_entries(maps::ENDPOINTS, s.endpoints)
            .map_max_entries(maps::EP_BY_ID, s.endpoints)
            .map_max_entries(maps::IPCACHE, s.ipcache)
            .map_max_entries(maps::CIDRS, s.cidrs)
            .map_max_entries(maps::PEER_CLASSES, s.peer_classes)
            .load(sluice_agent::datapath::EBPF_OBJECT)
            .context("loading the object for test runs")?;
        for name in [programs::FROM_POD, programs::TO_POD] {
            let p: &mut SchedClassifier = progs
                .program_mut(name)
                .ok_or_else(|| anyhow!("no program {name}"))?
                .try_into()?;
            p.load().with_context(|| format!("loading {name}"))?;
        }
        let endpoints_map = HashMap::try_from(
            progs
                .take_map(maps::ENDPOINTS)
                .ok_or_else(|| anyhow!("no map ENDPOINTS"))?,
        )?;
        let mut compiler = Compiler::new(Locality::All);
        let changes = compiler.resync(Resync {
            namespaces: Some(&world.namespaces),
            pods: Some(&world.pods),
            policies: Some(&world.policies),
            cluster_policies: Some(&world.cluster_policies),
            nodes: Some(&world.nodes),
        });
        let mut p = Self {
            compiler,
            dp,
            progs,
            endpoints_map,
            wired: BTreeMap::new(),
            profiles: BTreeMap::new(),
            next_ep: 1,
            next_sport: 20_000,
            world: world.clone(),
        };
        p.program(&changes)?;
        Ok(p)
    }

    /// Moves to `world` one object at a time, as watch events would come:
    /// each event goes through the compiler and its answer to the maps.
    pub fn set_world(&mut self, world: &World) -> Result<()> {
        let old = std::mem::replace(&mut self.world, world.clone());
        let key = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            (
                m.namespace.clone().unwrap_or_default(),
                m.name.clone().unwrap_or_default(),
            )
        };
        // Nodes and namespaces first (pods' identities follow them), then
        // pods, then policies, then ClusterNetworkPolicies; deletions of each
        // kind before its upserts.
        let new_nodes: BTreeSet<_> = world.nodes.iter().map(|n| key(&n.metadata)).collect();
        for n in &old.nodes {
            if !new_nodes.contains(&key(&n.metadata)) {
                let c = self
                    .compiler
                    .delete_node(n.metadata.name.as_deref().unwrap_or_default());
                self.program(&c)?;
            }
        }
        for n in &world.nodes {
            if !old.nodes.contains(n) {
                let c = self.compiler.upsert_node(n);
                self.program(&c)?;
            }
        }
        let new_ns: BTreeSet<_> = world.namespaces.iter().map(|n| key(&n.metadata)).collect();
        for n in &old.namespaces {
            if !new_ns.contains(&key(&n.metadata)) {
                let c = self
                    .compiler
                    .delete_namespace(n.metadata.name.as_deref().unwrap_or_default());
                self.program(&c)?;
            }
        }
        for n in &world.namespaces {
            if !old.namespaces.contains(n) {
                let c = self.compiler.upsert_namespace(n);
                self.program(&c)?;
            }
        }
        let new_pods: BTreeSet<_> = world.pods.iter().map(|p| key(&p.metadata)).collect();
        for p in &old.pods {
            let (ns, name) = key(&p.metadata);
            if !new_pods.contains(&(ns.clone(), name.clone())) {
                let c = self.compiler.delete_pod(&ns, &name);
                self.program(&c)?;
            }
        }
        for p in &world.pods {
            if !old.pods.contains(p) {
                let c = self.compiler.upsert_pod(p);
                self.program(&c)?;
            }
        }
        let new_pols: BTreeSet<_> = world.policies.iter().map(|p| key(&p.metadata)).collect();
        for p in &old.policies {
            let (ns, name) = key(&p.metadata);
            if !new_pols.contains(&(ns.clone(), name.clone())) {
                let c = self.compiler.delete_policy(&ns, &name);
                self.program(&c)?;
            }
        }
        for p in &world.policies {
            if !old.policies.contains(p) {
                let c = self.compiler.upsert_policy(p);
                self.program(&c)?;
            }
        }
        let new_cnps: BTreeSet<_> = world
            .cluster_policies
            .iter()
            .map(|p| key(&p.metadata))
            .collect();
        for p in &old.cluster_policies {
            if !new_cnps.contains(&key(&p.metadata)) {
                let c = self
                    .compiler
                    .delete_cluster_policy(p.metadata.name.as_deref().unwrap_or_default());
                self.program(&c)?;
            }
        }
        for p in &world.cluster_policies {
            if !old.cluster_policies.contains(p) {
                let c = self.compiler.upsert_cluster_policy(p);
                self.program(&c)?;
            }
        }
        Ok(())
    }

    /// What the agent's reconciler does with one answer of the compiler:
    /// endpoints wired or unwired (CNI ADD/DEL, which the compiler does
    /// not do: here a pod is wired while the compiler calls it local),
    /// ipcache changes, then each changed endpoint's identity and policy.
    fn program(&mut self, changes: &Changes) -> Result<()> {
        let w = |e: sluice_agent::datapath::DatapathError| anyhow!("map write: {e}");
        let mut fresh = BTreeSet::new();
        // DEL: gone pods, and pods whose addresses changed (a new sandbox).
        let gone: Vec<ObjectRef> = self
            .wired
            .iter()
            .filter(|(pod, wired)| {
                self.compiler.addresses_of(pod).map(record_ips)
                    != Some((wired.record.ipv4, wired.record.ipv6))
                    || !self.compiler.is_local(pod)
            })
            .map(|(pod, _)| pod.clone())
            .collect();
        for pod in gone {
            if let Some(wired) = self.wired.remove(&pod) {
                self.dp
                    .writer
                    .remove_endpoint(&wired.record, &wired.programmed)
                    .map_err(w)?;
            }
        }
        // ADD: local pods with an address that are not wired yet.
        let new: Vec<ObjectRef> = self
            .compiler
            .endpoints()
            .filter(|pod| !self.wired.contains_key(*pod))
            .cloned()
            .collect();
        for pod in new {
            let (ipv4, ipv6) = record_ips(self.compiler.addresses_of(&pod).unwrap_or_default());
            let Some(identity) = self.compiler.identity_of(&pod) else {
                continue;
            };
            if ipv4.is_none() && ipv6.is_none() {
                continue;
            }
            let ep_id = EpId(self.next_ep);
            self.next_ep += 1;
            let record = EndpointRecord {
                ep_id,
                identity,
                ifindex: FIRST_IFINDEX + ep_id.0,
                ipv4,
                ipv6,
                hairpin_tag: 0,
            };
            let none = Compiled::default();
            self.dp.writer.add_endpoint(&record, &none).map_err(w)?;
            self.wired.insert(
                pod.clone(),
                Wired {
                    record,
                    programmed: none,
                },
            );
            fresh.insert(pod);
        }
        // As the agent's reconciler orders it: profiles gain, classes, the
        // ipcache, endpoints, then profiles lose.
        let mut pruned = Vec::new();
        for &id in &changes.profiles {
            let new = match self.compiler.profile_policy(id) {
                Some(p) => p
                    .compile(PROFILE_KEY_FLAG | id)
                    .map_err(|e| anyhow!("compiling profile {id}: {e}"))?,
                None => Compiled::default(),
            };
            let old = self.profiles.remove(&id).unwrap_or_default();
            self.dp.writer.write_profile(id, &old, &new).map_err(w)?;
            pruned.push((id, old, new));
        }
        for (&identity, &class) in &changes.classes {
            self.dp.writer.set_peer_class(identity, class).map_err(w)?;
        }
        for (ip, identity) in &changes.ipcache {
            let local = self
                .wired
                .values()
                .find(|e| e.record.ips().any(|a| a == *ip))
                .map(|e| e.record.ep_id);
            match (identity, local) {
                (Some(identity), local) => self.dp.writer.set_ipcache(*ip, *identity, local),
                (None, None) => self.dp.writer.remove_ipcache(*ip),
                (None, Some(_)) => Ok(()),
            }
            .map_err(w)?;
        }
        for pod in changes.endpoints.iter().chain(fresh.iter()) {
            let Some(policy) = self.compiler.endpoint_policy(pod) else {
                continue;
            };
            let identity = self.compiler.identity_of(pod);
            let Some(wired) = self.wired.get_mut(pod) else {
                continue;
            };
            if let Some(identity) = identity
                && identity != wired.record.identity
            {
                wired.record.identity = identity;
                self.dp.writer.set_identity(&wired.record).map_err(w)?;
            }
            let new = policy
                .compile(wired.record.ep_id.0)
                .map_err(|e| anyhow!("compiling the policy of {pod}: {e}"))?;
            self.dp
                .writer
                .replace_policy(&wired.record, &wired.programmed, &new)
                .map_err(w)?;
            wired.programmed = new;
        }
        for (id, old, new) in pruned {
            self.dp.writer.prune_profile(id, &old, &new).map_err(w)?;
            if !new.entries.is_empty() {
                self.profiles.insert(id, new);
            }
        }
        Ok(())
    }

    /// The data path's verdict on a new flow (a fresh source port each
    /// time, so conntrack has no entry for it): the source endpoint's
    /// `from_pod`, then the destination endpoint's `to_pod`; an address
    /// that is no endpoint has no program to pass.
    pub fn allowed(&mut self, src: IpAddr, dst: IpAddr, proto: Proto, port: u16) -> Result<bool> {
        self.next_sport = if self.next_sport >= 60_000 {
            20_000
        } else {
            self.next_sport + 1
        };
        let frame = frame(src, self.next_sport, dst, port, proto);
        for (addr, name) in [(src, programs::FROM_POD), (dst, programs::TO_POD)] {
            let Some(ifindex) = self
                .wired
                .values()
                .find(|e| e.record.ips().any(|a| a == addr))
                .map(|e| e.record.ifindex)
            else {
                continue;
            };
            let info = self
                .endpoints_map
                .get(&ifindex, 0)
                .with_context(|| format!("ENDPOINTS[{ifindex}]"))?;
            self.endpoints_map.insert(&LOOPBACK, &info, 0)?;
            let prog: &SchedClassifier = self
                .progs
                .program(name)
                .ok_or_else(|| anyhow!("no program {name}"))?
                .try_into()?;
            let r = prog.test_run(TestRunOptions {
                data_in: Some(&frame),
                ..TestRunOptions::default()
            })?;
            match r.return_value {
                TC_ACT_OK => {}
                TC_ACT_SHOT => return Ok(false),
                other => bail!("{name} returned {other}"),
            }
        }
        Ok(true)
    }
}

fn record_ips(ips: &[IpAddr]) -> (Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>) {
    let v4 = ips.iter().find_map(|a| match a {
        IpAddr::V4(a) => Some(*a),
        IpAddr::V6(_) => None,
    });
    let v6 = ips.iter().find_map(|a| match a {
        IpAddr::V6(a) => Some(*a),
        IpAddr::V4(_) => None,
    });
    (v4, v6)
}

/// An Ethernet frame opening a flow: a TCP SYN, a UDP datagram or an SCTP
/// INIT. Checksums stay zero: the data path does not read them.
pub fn frame(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, p: Proto) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    let l4_proto = match p {
        Proto::Tcp => {
            l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 5 << 4, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
            proto::TCP
        }
        Proto::Udp => {
            l4.extend_from_slice(&12u16.to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
            l4.extend_from_slice(b"data");
            proto::UDP
        }
        Proto::Sctp => {
            l4.extend_from_slice(&[0; 8]);
            l4.extend_from_slice(&[1, 0, 0, 4]);
            proto::SCTP
        }
    };
    let mut f = vec![0u8; 12];
    f[0] = 0x02;
    f[6] = 0x02;
    f[11] = 1;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            let total = (20 + l4.len()) as u16;
            f.extend_from_slice(&[0x45, 0]);
            f.extend_from_slice(&total.to_be_bytes());
            f.extend_from_slice(&[0, 1, 0x40, 0, 64, l4_proto, 0, 0]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&0x86ddu16.to_be_bytes());
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            f.extend_from_slice(&[l4_proto, 64]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
        }
        _ => {
            // Mixed families never reach here: probes pick one family.
            f.extend_from_slice(&0u16.to_be_bytes());
        }
    }
    f.extend_from_slice(&l4);
    f
}
