//! `deploy/sluice.yaml` against what the agent and plugin need: the RBAC
//! rules cover every kind the agent watches and the Events it posts, the
//! agent learns its node name, and the shipped conflist is one the plugin
//! accepts (ranges from the Node's podCIDRs). No kernel, no cluster.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers outside #[test] fns (clippy.toml covers only those): a panic is the failure report"
)]

use serde::Deserialize as _;
use serde_json::Value;
use sluice_agent::model::Kind;

fn documents() -> Vec<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/sluice.yaml");
    let text = std::fs::read_to_string(path).expect("deploy/sluice.yaml");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("a YAML document"))
        .collect()
}

fn of_kind(docs: &[Value], kind: &str) -> Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0].clone()
}

/// Does a rule of `role` grant `verb` on `group`/`resource`?
fn grants(role: &Value, group: &str, resource: &str, verb: &str) -> bool {
    let has = |v: &Value, x: &str| {
        v.as_array()
            .is_some_and(|a| a.iter().any(|e| e == x || e == "*"))
    };
    role["rules"].as_array().unwrap().iter().any(|r| {
        has(&r["apiGroups"], group) && has(&r["resources"], resource) && has(&r["verbs"], verb)
    })
}

#[test]
fn the_cluster_role_lets_the_agent_watch_every_kind_it_watches_and_post_events() {
    let docs = documents();
    let role = of_kind(&docs, "ClusterRole");
    for kind in Kind::ALL {
        let (group, resource) = match kind {
            Kind::Pod => ("", "pods"),
            Kind::Namespace => ("", "namespaces"),
            Kind::Node => ("", "nodes"),
            Kind::Service => ("", "services"),
            Kind::NetworkPolicy => ("networking.k8s.io", "networkpolicies"),
            Kind::ClusterNetworkPolicy => ("policy.networking.k8s.io", "clusternetworkpolicies"),
        };
        for verb in ["get", "list", "watch"] {
            assert!(grants(&role, group, resource, verb), "{verb} {resource}");
        }
    }
    // kube's event Recorder creates, then patches a series.
    for verb in ["create", "patch"] {
        assert!(
            grants(&role, "events.k8s.io", "events", verb),
            "{verb} events"
        );
    }
    let binding = of_kind(&docs, "ClusterRoleBinding");
    let account = of_kind(&docs, "ServiceAccount");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["name"], account["metadata"]["name"]);
    assert_eq!(
        binding["subjects"][0]["namespace"],
        account["metadata"]["namespace"]
    );
    let ds = of_kind(&docs, "DaemonSet");
    assert_eq!(
        ds["spec"]["template"]["spec"]["serviceAccountName"],
        account["metadata"]["name"]
    );
}

#[test]
fn the_agent_knows_its_node_and_the_shipped_conflist_takes_ranges_from_it() {
    let docs = documents();
    let ds = of_kind(&docs, "DaemonSet");
    let agent = &ds["spec"]["template"]["spec"]["containers"][0];
    let env = agent["env"].as_array().expect("env");
    assert!(
        env.iter().any(|e| e["name"] == "NODE_NAME"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"),
        "NODE_NAME from spec.nodeName"
    );
    let cm = of_kind(&docs, "ConfigMap");
    let conflist: Value =
        serde_json::from_str(cm["data"]["10-sluice.conflist"].as_str().expect("conflist"))
            .expect("conflist JSON");
    // What a runtime hands the plugin: the list's name and version, and
    // the plugin's own keys.
    let mut conf = conflist["plugins"][0].clone();
    conf["cniVersion"] = conflist["cniVersion"].clone();
    conf["name"] = conflist["name"].clone();
    assert_eq!(conf["type"], "sluice");
    let parsed =
        sluice_cni::config::parse(conf.to_string().as_bytes()).expect("the plugin accepts it");
    assert_eq!(parsed.ranges, None, "addresses from the Node's podCIDRs");
    let socket = agent["command"]
        .as_array()
        .unwrap()
        .windows(2)
        .find(|w| w[0] == "--socket")
        .map(|w| w[1].as_str().unwrap().to_owned())
        .expect("--socket");
    assert_eq!(parsed.agent_socket.to_string_lossy(), socket);
}

#[test]
fn the_agent_attaches_to_host_to_the_host_cgroup_root_not_its_own() {
    let docs = documents();
    let ds = of_kind(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let agent = &pod["containers"][0];
    let arg = |name: &str| {
        agent["command"]
            .as_array()
            .unwrap()
            .windows(2)
            .find(|w| w[0] == name)
            .map(|w| w[1].as_str().unwrap().to_owned())
    };
    let cgroup = arg("--host-cgroup").expect("--host-cgroup");
    let mount = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == cgroup.as_str())
        .expect("a volume mounted at --host-cgroup");
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("its volume");
    assert_eq!(volume["hostPath"]["path"], "/sys/fs/cgroup");
}

/// containerd 1.6/1.7 read `cniVersion` only (their libcni ignores
/// `cniVersions`) and cannot parse a 1.1.0 result; containerd 2.x and
/// CRI-O pick the highest of `cniVersions`. The plugin serves both, and
/// its deletion queue is the one the agent drains.
#[test]
fn the_shipped_conflist_is_1_0_0_for_old_runtimes_and_1_1_0_for_new_ones() {
    let docs = documents();
    let cm = of_kind(&docs, "ConfigMap");
    let conflist: Value =
        serde_json::from_str(cm["data"]["10-sluice.conflist"].as_str().expect("conflist"))
            .expect("conflist JSON");
    assert_eq!(conflist["cniVersion"], "1.0.0");
    assert_eq!(
        conflist["cniVersions"],
        serde_json::json!(["1.0.0", "1.1.0"])
    );
    let plugin = &conflist["plugins"][0];
    for (version, runtime) in [
        ("1.0.0", "containerd 1.6/1.7"),
        ("1.1.0", "containerd 2.x, CRI-O"),
    ] {
        let mut conf = plugin.clone();
        conf["cniVersion"] = version.into();
        conf["name"] = conflist["name"].clone();
        let parsed = sluice_cni::config::parse(conf.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("{runtime}: {e}"));
        assert_eq!(parsed.version.as_str(), version, "{runtime}");
    }
    // Without cniVersion (a runtime that negotiates) the plugin picks 1.1.0.
    let mut negotiated = plugin.clone();
    negotiated["cniVersions"] = conflist["cniVersions"].clone();
    negotiated["name"] = conflist["name"].clone();
    let parsed = sluice_cni::config::parse(negotiated.to_string().as_bytes()).unwrap();
    assert_eq!(parsed.version.as_str(), "1.1.0");

    // The queue DEL writes to when the agent is down is the agent's.
    let ds = of_kind(&docs, "DaemonSet");
    let agent = &ds["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = agent["command"]
        .as_array()
        .into_iter()
        .chain(agent["args"].as_array())
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    let arg = |name: &str| args.windows(2).find(|w| w[0] == name).map(|w| w[1].clone());
    let drained = arg("--delete-queue-dir").unwrap_or_else(|| {
        format!(
            "{}/delete-queue",
            arg("--state-dir").unwrap_or_else(|| "/var/lib/sluice".into())
        )
    });
    assert_eq!(plugin["deleteQueueDir"], drained.as_str());
    let mounted = agent["volumeMounts"].as_array().unwrap().iter().any(|m| {
        m["mountPath"]
            .as_str()
            .is_some_and(|p| drained.starts_with(p) && m["readOnly"] != true)
    });
    assert!(mounted, "the agent mounts {drained} writable");
}

/// `--flag VALUE` of a container's command.
fn flag(container: &Value, name: &str) -> Option<String> {
    container["command"]
        .as_array()?
        .windows(2)
        .find(|w| w[0] == name)
        .and_then(|w| w[1].as_str().map(str::to_owned))
}

/// The volume mount of `container` that holds `path`, and its volume.
fn mount_of<'a>(pod: &'a Value, container: &'a Value, path: &str) -> (&'a Value, &'a Value) {
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| {
            let at = m["mountPath"].as_str().unwrap();
            path == at || path.starts_with(&format!("{}/", at.trim_end_matches('/')))
        })
        .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
        .unwrap_or_else(|| {
            panic!("{path} is on no volume mount: the root filesystem is read-only")
        });
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mount's volume");
    (mount, volume)
}

#[test]
fn the_daemonset_is_hardened_and_everything_it_writes_is_on_a_host_path_it_mounts() {
    let docs = documents();
    let ds = of_kind(&docs, "DaemonSet");
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"].is_number());
    let pod = &ds["spec"]["template"]["spec"];
    let agent = &pod["containers"][0];
    let init = &pod["initContainers"][0];
    for c in [agent, init] {
        assert_eq!(c["image"], "sluice:0.1.0");
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        let sc = &c["securityContext"];
        assert!(sc["privileged"].is_null() || sc["privileged"] == false);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
        assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
        assert!(c["resources"]["requests"]["memory"].is_string());
        assert!(c["resources"]["limits"]["memory"].is_string());
        let cmd: Vec<&str> = c["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(cmd[0].ends_with("/sluice-agent"), "no shell: {cmd:?}");
    }
    // The init container installs the plugin through our own subcommand,
    // into the host's CNI bin directory, and needs no capability.
    assert_eq!(init["command"][1], "install-cni");
    assert!(init["securityContext"]["capabilities"]["add"].is_null());
    let bin = flag(init, "--cni-bin-dir").expect("--cni-bin-dir");
    let (mount, volume) = mount_of(pod, init, &bin);
    assert_ne!(mount["readOnly"], true);
    assert_eq!(volume["hostPath"]["path"], "/opt/cni/bin");

    // Where the agent writes: host paths, mounted writable.
    for (arg, host) in [
        ("--bpffs", "/sys/fs/bpf"),
        ("--socket", "/run/sluice"),
        ("--state-dir", "/var/lib/sluice"),
        ("--cni-conf-dir", "/etc/cni/net.d"),
    ] {
        let path = flag(agent, arg).unwrap_or_else(|| panic!("{arg}"));
        let (mount, volume) = mount_of(pod, agent, &path);
        assert_ne!(mount["readOnly"], true, "{arg} {path} writable");
        assert_eq!(volume["hostPath"]["path"], host, "{arg}");
        // Bidirectional propagation is for privileged containers only.
        assert_ne!(mount["mountPropagation"], "Bidirectional");
    }
    // What it only reads: the conflist from the ConfigMap, the cgroup.
    let conflist = flag(agent, "--cni-conflist").expect("--cni-conflist");
    let (_, volume) = mount_of(pod, agent, &conflist);
    assert_eq!(
        volume["configMap"]["name"],
        of_kind(&docs, "ConfigMap")["metadata"]["name"]
    );
    assert!(
        of_kind(&docs, "ConfigMap")["data"]
            .get(conflist.rsplit('/').next().unwrap())
            .is_some(),
        "the ConfigMap holds {conflist}"
    );
    // No host path that no container mounts.
    for v in pod["volumes"].as_array().unwrap() {
        let used = [agent, init].iter().any(|c| {
            c["volumeMounts"]
                .as_array()
                .is_some_and(|ms| ms.iter().any(|m| m["name"] == v["name"]))
        });
        assert!(used, "volume {} is mounted nowhere", v["name"]);
    }
    // Probes on the metrics port: liveness /healthz, readiness /readyz.
    let port: u64 = flag(agent, "--metrics-addr")
        .and_then(|a| a.rsplit(':').next().and_then(|p| p.parse().ok()))
        .expect("--metrics-addr");
    let named = agent["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["containerPort"] == port)
        .expect("the metrics port is declared");
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ] {
        assert_eq!(agent[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(agent[probe]["httpGet"]["port"], named["name"], "{probe}");
    }
}

/// Every manifest in deploy/ and deploy/examples/.
fn manifests() -> Vec<std::path::PathBuf> {
    let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy"));
    let mut out = Vec::new();
    for dir in [root.to_owned(), root.join("examples")] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(p);
            }
        }
    }
    out.sort();
    assert!(out.len() >= 3, "{out:?}");
    out
}

/// The Kubernetes versions Sluice supports (docs/install.md).
const KUBERNETES_VERSIONS: [&str; 6] = ["1.30", "1.31", "1.32", "1.33", "1.34", "1.35"];

#[test]
fn every_manifest_passes_strict_schema_validation_for_each_supported_kubernetes_version() {
    let files = manifests();
    for version in KUBERNETES_VERSIONS {
        let out = std::process::Command::new("kubernetes-validate")
            .args(["--strict", "--no-warn", "-k", version])
            .args(&files)
            .output()
            .expect("kubernetes-validate (PyPI; scripts/setup.sh installs it)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "Kubernetes {version}:\n{text}");
        // One "passed" line per document: none skipped unknown.
        let docs: usize = files
            .iter()
            .map(|f| {
                serde_yaml_ng::Deserializer::from_str(&std::fs::read_to_string(f).unwrap()).count()
            })
            .sum();
        assert_eq!(
            text.matches(" passed for resource ").count(),
            docs,
            "{text}"
        );
    }
}

#[test]
fn kubectl_applies_every_kind_of_deploy_that_the_test_api_server_serves() {
    let server = sluice_test_apiserver::Server::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let dir = std::env::temp_dir().join(format!("sluice-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let mut served = Vec::new();
    let mut skipped = Vec::new();
    for f in manifests() {
        let text = std::fs::read_to_string(&f).unwrap();
        for d in serde_yaml_ng::Deserializer::from_str(&text) {
            let doc = Value::deserialize(d).unwrap();
            let (api_version, kind) = (
                doc["apiVersion"].as_str().unwrap(),
                doc["kind"].as_str().unwrap(),
            );
            if sluice_test_apiserver::resources::by_kind(api_version, kind).is_some() {
                served.push(doc);
            } else {
                skipped.push(kind.to_owned());
            }
        }
    }
    for ns in served
        .iter()
        .filter_map(|d| d["metadata"]["namespace"].as_str())
        .collect::<std::collections::BTreeSet<_>>()
    {
        server.create_namespace(ns).unwrap();
    }
    // As JSON, one file each: written back as YAML, `"y"` would come out
    // plain and kubectl's YAML 1.1 reader would take it for `true`.
    let applied = dir.join("served");
    std::fs::create_dir_all(&applied).unwrap();
    for (i, d) in served.iter().enumerate() {
        std::fs::write(applied.join(format!("{i}.json")), d.to_string()).unwrap();
    }
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["apply", "-f"])
        .arg(&applied)
        .output()
        .expect("kubectl");
    let _cleanup = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!served.is_empty(), "nothing served: {skipped:?}");
    for d in &served {
        let plural = sluice_test_apiserver::resources::by_kind(
            d["apiVersion"].as_str().unwrap(),
            d["kind"].as_str().unwrap(),
        )
        .unwrap()
        .plural;
        let got = server
            .get(
                plural,
                d["metadata"]["namespace"].as_str().unwrap_or_default(),
                d["metadata"]["name"].as_str().unwrap(),
            )
            .unwrap_or_else(|| panic!("{} applied", d["metadata"]["name"]));
        // What the manifest says, as given (the server may add defaults,
        // e.g. policyTypes).
        for (k, v) in d["spec"].as_object().unwrap() {
            assert_eq!(&got["spec"][k], v, "{} {k}", d["metadata"]["name"]);
        }
    }
    eprintln!(
        "applied {} objects; not served by the test API server: {skipped:?}",
        served.len()
    );
}
