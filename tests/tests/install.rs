//! Installing on a node as the DaemonSet does, and taking Sluice off again:
//! `sluice-agent install-cni` (the init container), the conflist the agent
//! writes only once ready, and `sluice-agent uninstall`. Root: real
//! agents, bpffs, veths.
use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use aya::programs::{SchedClassifier, TcAttachType};
use serde_json::Value;
use sluice_test_apiserver::{Config, Server as ApiServer};
use sluice_tests::{ApiNode, NODE_IPV4, Node, Pod, TempDir, bin_dir, conflist_config};

const CONFLIST: &str = r#"{"cniVersion":"1.0.0","cniVersions":["1.0.0","1.1.0"],"name":"sluice","plugins":[{"type":"sluice"}]}"#;

fn agent(args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(bin_dir().join("sluice-agent"))
        .args(args)
        .output()?)
}

fn mode(p: &Path) -> Result<u32> {
    Ok(std::fs::metadata(p)?.permissions().mode() & 0o7777)
}

#[test]
fn install_cni_copies_the_plugin_next_to_it_and_the_conflist_atomically_and_again_is_a_no_op()
-> Result<()> {
    let dir = TempDir::new("sluice-install-")?;
    let (bin, conf) = (dir.0.join("opt/cni/bin"), dir.0.join("etc/cni/net.d"));
    let src = dir.0.join("10-sluice.conflist");
    std::fs::write(&src, CONFLIST)?;
    let args = [
        "install-cni",
        "--cni-bin-dir",
        &bin.to_string_lossy(),
        "--cni-conf-dir",
        &conf.to_string_lossy(),
        "--conflist",
        &src.to_string_lossy(),
    ]
    .map(|s| s.to_owned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = agent(&args)?;
    ensure!(out.status.success(), "{out:?}");
    // The default plugin is `sluice` beside the agent, as in the image.
    let plugin = bin.join("sluice");
    assert_eq!(
        std::fs::read(&plugin)?,
        std::fs::read(bin_dir().join("sluice"))?
    );
    assert_eq!(mode(&plugin)?, 0o755);
    let installed = conf.join("10-sluice.conflist");
    assert_eq!(std::fs::read_to_string(&installed)?, CONFLIST);
    assert_eq!(mode(&installed)?, 0o644);
    let inodes = (
        std::fs::metadata(&plugin)?.ino(),
        std::fs::metadata(&installed)?.ino(),
    );
    let out = agent(&args)?;
    ensure!(out.status.success(), "{out:?}");
    assert_eq!(
        (
            std::fs::metadata(&plugin)?.ino(),
            std::fs::metadata(&installed)?.ino()
        ),
        inodes,
        "identical content is left alone"
    );
    for d in [&bin, &conf] {
        assert_eq!(std::fs::read_dir(d)?.count(), 1, "no temporary file left");
    }
    // A broken conflist is refused and the installed one stays.
    std::fs::write(&src, "{\"cniVersion\": \"1.0")?;
    let out = agent(&args)?;
    ensure!(!out.status.success(), "a broken conflist is refused");
    assert_eq!(std::fs::read_to_string(&installed)?, CONFLIST);
    Ok(())
}

/// `(status line, body)` of `/readyz`.
fn readyz(node: &Node) -> Option<(String, String)> {
    node.http_get("/readyz")
        .ok()
        .map(|(h, b)| (h.lines().next().unwrap_or_default().to_owned(), b))
}

#[test]
fn the_agent_writes_the_conflist_only_once_synced_with_the_api_server_and_never_half_written()
-> Result<()> {
    let ApiNode { mut node, api, .. } = ApiNode::new("node-1", "10.122.0.0/24", "fd00:122::/64")?;
    let addr = api.addr();
    // The API server is down when the agent starts.
    let store = api.stop();
    let conf = TempDir::new("sluice-conf-")?;
    let src = conf.0.join("10-sluice.conflist");
    std::fs::write(&src, CONFLIST)?;
    let net_d = conf.0.join("net.d");
    let dest = net_d.join("10-sluice.conflist");
    node.agent_args.extend([
        "--cni-conf-dir".into(),
        net_d.to_string_lossy().into_owned(),
        "--cni-conflist".into(),
        src.to_string_lossy().into_owned(),
        "--resync-seconds".into(),
        "1".into(),
    ]);
    node.start_agent_unsynced()?; // its socket answers STATUS
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert!(!dest.exists(), "no conflist before the agent is synced");
        if let Some((status, body)) = readyz(&node) {
            assert!(status.contains("503"), "{status}");
            assert_eq!(body, "not ready: not synced with the API server\n");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let api = node.ns.run(move || {
        ApiServer::start_with_store(
            Config {
                listen: addr,
                ..Config::default()
            },
            store,
        )
    })??;
    // Watch the directory closely: the file is absent or whole, and when
    // it is there the agent says it is ready.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        match std::fs::read(&dest) {
            Ok(data) => {
                let v: Value = serde_json::from_slice(&data).context("a whole conflist")?;
                assert_eq!(v, serde_json::from_str::<Value>(CONFLIST)?);
                let (status, body) = readyz(&node).context("/readyz")?;
                assert!(status.contains("200"), "{status} {body}");
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        ensure!(
            Instant::now() < deadline,
            "no conflist once the API server is back"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        std::fs::read_dir(&net_d)?.count(),
        1,
        "no temporary file left"
    );
    // Removed by someone: written again (within a resync).
    std::fs::remove_file(&dest)?;
    assert!(
        sluice_tests::eventually(Duration::from_secs(10), || dest.exists()),
        "written again"
    );
    drop(api);
    Ok(())
}

/// The names of the TCX programs on `ifname` (both directions) in the
/// node's namespace, as the kernel reports them (bpftool 7.1 predates TCX).
fn tc_programs(node: &Node, ifname: &str) -> Result<Vec<String>> {
    let name = std::ffi::CString::new(ifname)?;
    node.ns.run(move || -> Result<Vec<String>> {
        let mut out = Vec::new();
        for dir in [TcAttachType::Ingress, TcAttachType::Egress] {
            let (_, progs) = SchedClassifier::query_tcx(name.as_c_str(), dir)?;
            out.extend(
                progs
                    .iter()
                    .map(|p| p.name_as_str().unwrap_or_default().to_owned()),
            );
        }
        Ok(out)
    })?
}

fn cgroup_programs(dir: &Path) -> Result<String> {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(dir)
        .output()?;
    ensure!(out.status.success(), "bpftool: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[test]
fn uninstall_detaches_and_unpins_everything_and_removes_the_files_but_no_interface_or_address()
-> Result<()> {
    let mut node = Node::new()?;
    let files = TempDir::new("sluice-uninstall-")?;
    let (bin, net_d) = (files.0.join("bin"), files.0.join("net.d"));
    let src = files.0.join("10-sluice.conflist");
    std::fs::write(&src, CONFLIST)?;
    node.agent_args.extend([
        "--cni-conf-dir".into(),
        net_d.to_string_lossy().into_owned(),
        "--cni-conflist".into(),
        src.to_string_lossy().into_owned(),
    ]);
    let out = agent(&["install-cni", "--cni-bin-dir", &bin.to_string_lossy()])?;
    ensure!(out.status.success(), "{out:?}");
    node.start_agent()?;
    let config = conflist_config(&node, Some("10.123.0.0/24"), Some("fd00:123::/64"));
    let pod = Pod::add(&node, &config)?;
    let veth = pod.host_ifname.as_str();
    let attached = tc_programs(&node, veth)?;
    ensure!(attached.len() == 2, "attached to {veth}: {attached:?}");
    ensure!(
        !cgroup_programs(&node.cgroup.dir)?.is_empty(),
        "to_host attached"
    );
    assert!(
        sluice_tests::eventually(Duration::from_secs(30), || net_d
            .join("10-sluice.conflist")
            .exists()),
        "conflist written"
    );
    let addrs_before = node.ns.ip(&["-br", "addr"])?;
    let routes_before = node.ns.ip(&["route"])?;
    // The VXLAN device an agent with --tunnel leaves behind (Sluice's own
    // interface, the one uninstall removes).
    node.ns.ip(&[
        "link",
        "add",
        "sluice-vxlan",
        "type",
        "vxlan",
        "id",
        "7",
        "dstport",
        "4789",
    ])?;

    node.kill_agent()?;
    let bpffs = node.bpffs.dir.to_string_lossy().into_owned();
    let args = [
        "uninstall",
        "--bpffs",
        &bpffs,
        "--cni-conf-dir",
        &net_d.to_string_lossy(),
        "--cni-bin-dir",
        &bin.to_string_lossy(),
        "--state-dir",
        &node.state_dir().to_string_lossy(),
    ]
    .map(|s| s.to_owned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = node
        .ns
        .command(bin_dir().join("sluice-agent"))
        .args(&args)
        .output()?;
    ensure!(out.status.success(), "uninstall: {out:?}");

    // Nothing of Sluice's is pinned any more (the kernel's own preload
    // entries of a bpffs mount aside), nothing attached.
    let left: Vec<String> = std::fs::read_dir(&node.bpffs.dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    assert!(
        left.iter().all(|n| n.ends_with(".debug")),
        "pins left: {left:?}"
    );
    assert!(
        sluice_tests::eventually(Duration::from_secs(5), || tc_programs(&node, veth)
            .is_ok_and(|p| p.is_empty())),
        "programs still on {veth}: {:?}",
        tc_programs(&node, veth)
    );
    // The kernel frees an unpinned link from a work queue.
    assert!(
        sluice_tests::eventually(Duration::from_secs(5), || cgroup_programs(&node.cgroup.dir)
            .is_ok_and(|p| p.is_empty())),
        "to_host still attached: {:?}",
        cgroup_programs(&node.cgroup.dir)
    );
    assert!(!net_d.join("10-sluice.conflist").exists());
    assert!(!bin.join("sluice").exists());
    assert!(!node.state_dir().exists());
    assert!(
        node.ns.ip(&["link", "show", "sluice-vxlan"]).is_err(),
        "sluice-vxlan left"
    );
    // The pod's interface and the node's addresses and routes are as they
    // were.
    assert_eq!(node.ns.ip(&["-br", "addr"])?, addrs_before);
    assert_eq!(node.ns.ip(&["route"])?, routes_before);
    assert!(addrs_before.contains(NODE_IPV4.trim_end_matches("/32")));
    assert!(addrs_before.contains(veth));

    // Twice is fine.
    let out = node
        .ns
        .command(bin_dir().join("sluice-agent"))
        .args(&args)
        .output()?;
    ensure!(out.status.success(), "uninstall again: {out:?}");
    Ok(())
}
