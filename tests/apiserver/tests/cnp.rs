//! ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2, cluster-scoped):
//! kubectl apply/get/delete/get -w on deploy/examples/cluster/, kube-rs
//! typed create/list/watch with sluice-api's types, and a server configured
//! like a cluster without the CRD.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::Stdio,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use common::kubectl::{Cluster, path_str};
use futures::{StreamExt as _, TryStreamExt as _};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::watcher,
};
use serde_json::{Value, json};
use sluice_api::{Action, ClusterNetworkPolicy, Tier};
use sluice_test_apiserver::{Config, Server, ServerHandle};

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/examples/cluster")
}

const EXAMPLE_NAMES: [&str; 4] = [
    "block-metadata",
    "default-deny",
    "isolate-tenant-blue",
    "isolate-tenant-green",
];

#[test]
fn kubectl_applies_gets_and_deletes_the_cluster_network_policy_examples() -> Result<()> {
    let Some(c) =
        Cluster::start("kubectl_applies_gets_and_deletes_the_cluster_network_policy_examples")?
    else {
        return Ok(());
    };
    let dir = examples();
    let out = c.ok(&["apply", "-f", path_str(&dir)?])?;
    for name in EXAMPLE_NAMES {
        let line = format!("clusternetworkpolicy.policy.networking.k8s.io/{name} created");
        ensure!(out.contains(&line), "{line:?} missing from:\n{out}");
    }
    assert_eq!(c.server.names("clusternetworkpolicies"), EXAMPLE_NAMES);
    // Cluster-scoped: stored without a namespace.
    let stored = c
        .server
        .get("clusternetworkpolicies", "", "block-metadata")
        .context("stored")?;
    assert!(stored["metadata"].get("namespace").is_none(), "{stored}");

    // The CRD's printer columns, by the plural and the short name.
    let table = c.ok(&["get", "clusternetworkpolicies"])?;
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0], ["NAME", "TIER", "PRIORITY", "AGE"], "{table}");
    assert!(
        rows.iter()
            .any(|r| r[..3] == ["block-metadata", "Admin", "10"]),
        "{table}"
    );
    assert!(
        rows.iter()
            .any(|r| r[..3] == ["default-deny", "Baseline", "100"]),
        "{table}"
    );
    let one: Value =
        serde_json::from_str(&c.ok(&["get", "cnp", "block-metadata", "-o", "json"])?)?;
    let cnp: ClusterNetworkPolicy = serde_json::from_value(one)?;
    assert_eq!(cnp.spec.tier, Tier::Admin);
    assert_eq!(cnp.spec.egress[0].name, "deny-imds");

    // Applying a changed file patches the object (a JSON merge patch: kubectl
    // does not compile this kind in).
    let changed = std::fs::read_to_string(dir.join("block-cloud-metadata.yaml"))?
        .replace("priority: 10", "priority: 5")
        .replace("action: Deny", "action: Pass");
    let f = c.file("changed.yaml", &changed)?;
    let out = c.ok(&["apply", "-f", path_str(&f)?])?;
    ensure!(out.contains("block-metadata configured"), "{out}");
    let patched = c
        .server
        .get("clusternetworkpolicies", "", "block-metadata")
        .context("patched")?;
    assert_eq!(patched["spec"]["priority"], 5);
    assert_eq!(patched["spec"]["egress"][0]["action"], "Pass");
    assert_eq!(
        patched["spec"]["egress"][0]["to"][0]["networks"][1],
        "fd00:ec2::254/128"
    );

    let out = c.ok(&["delete", "-f", path_str(&dir)?])?;
    for name in EXAMPLE_NAMES {
        let line = format!("clusternetworkpolicy.policy.networking.k8s.io \"{name}\" deleted");
        ensure!(out.contains(&line), "{line:?} missing from:\n{out}");
    }
    assert!(c.server.names("clusternetworkpolicies").is_empty());
    Ok(())
}

#[test]
fn kubectl_get_watch_follows_cluster_network_policies() -> Result<()> {
    let Some(c) = Cluster::start("kubectl_get_watch_follows_cluster_network_policies")? else {
        return Ok(());
    };
    let metadata = examples().join("block-cloud-metadata.yaml");
    c.ok(&["apply", "-f", path_str(&metadata)?])?;
    let mut child = c
        .command(&["get", "cnp", "-w"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |what: &dyn Fn(&str) -> bool| -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if what(&line) => return Ok(line),
                Ok(_) => {}
                Err(_) => bail!("kubectl get -w printed nothing matching in time"),
            }
        }
    };
    let result = (|| -> Result<()> {
        wait_for(&|l| l.starts_with("block-metadata ") && l.contains("Admin"))?;
        let deny = examples().join("baseline-default-deny.yaml");
        c.ok(&["apply", "-f", path_str(&deny)?])?;
        wait_for(&|l| l.starts_with("default-deny ") && l.contains("Baseline"))?;
        Ok(())
    })();
    child.kill()?;
    child.wait()?;
    result
}

async fn client(server: &ServerHandle) -> Result<Client> {
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig())?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn cnp(name: &str, priority: i32) -> Result<ClusterNetworkPolicy> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
        "spec": {
            "tier": "Admin",
            "priority": priority,
            "subject": {"namespaces": {}},
            "egress": [{"name": "deny-imds", "action": "Deny", "to": [{"networks": ["169.254.169.254/32"]}]}]
        }
    }))?)
}

/// The next watcher event as `Kind(name)`.
async fn next(
    stream: &mut (
             impl futures::Stream<Item = watcher::Result<watcher::Event<ClusterNetworkPolicy>>> + Unpin
         ),
) -> Result<String> {
    let ev = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .context("no watcher event within 5s")??
        .context("the watcher ended")?;
    let name = |o: &ClusterNetworkPolicy| o.metadata.name.clone().unwrap_or_default();
    Ok(match ev {
        watcher::Event::Init => "Init".into(),
        watcher::Event::InitApply(o) => format!("InitApply({})", name(&o)),
        watcher::Event::InitDone => "InitDone".into(),
        watcher::Event::Apply(o) => format!("Apply({})", name(&o)),
        watcher::Event::Delete(o) => format!("Delete({})", name(&o)),
    })
}

#[tokio::test]
async fn kube_rs_creates_lists_patches_and_watches_cluster_network_policies() -> Result<()> {
    let server = Server::start("127.0.0.1:0".parse()?)?;
    let api: Api<ClusterNetworkPolicy> = Api::all(client(&server).await?);
    api.create(&PostParams::default(), &cnp("first", 10)?)
        .await?;

    let mut stream = watcher(api.clone(), watcher::Config::default()).boxed();
    for want in ["Init", "InitApply(first)", "InitDone"] {
        assert_eq!(next(&mut stream).await?, want);
    }
    let created = api
        .create(&PostParams::default(), &cnp("second", 20)?)
        .await?;
    assert!(created.metadata.resource_version.is_some());
    assert_eq!(next(&mut stream).await?, "Apply(second)");

    let patch = json!({"spec": {"egress": [{"action": "Pass", "to": [{"namespaces": {}}]}]}});
    let patched = api
        .patch("second", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    assert_eq!(patched.spec.egress[0].action, Action::Pass);
    assert_eq!(next(&mut stream).await?, "Apply(second)");

    let listed = api.list(&ListParams::default()).await?;
    let names: Vec<_> = listed
        .items
        .iter()
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    assert_eq!(names, ["first", "second"]);

    api.delete("second", &DeleteParams::default()).await?;
    assert_eq!(next(&mut stream).await?, "Delete(second)");
    Ok(())
}

#[tokio::test]
async fn without_custom_resources_the_kind_is_absent_like_a_missing_crd() -> Result<()> {
    let server = Server::start_with(Config {
        custom_resources: false,
        ..Config::default()
    })?;
    let api: Api<ClusterNetworkPolicy> = Api::all(client(&server).await?);
    match api.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        other => bail!("want 404, got {other:?}"),
    }
    let r = common::get(server.addr(), "/apis/policy.networking.k8s.io/v1alpha2")?;
    assert_eq!(r.code, 404);
    let groups = common::get(server.addr(), "/apis")?.json()?;
    let names: Vec<&str> = groups["groups"]
        .as_array()
        .context("groups")?
        .iter()
        .filter_map(|g| g["name"].as_str())
        .collect();
    assert!(names.contains(&"networking.k8s.io"), "{names:?}");
    assert!(!names.contains(&"policy.networking.k8s.io"), "{names:?}");
    Ok(())
}

#[test]
fn without_custom_resources_kubectl_says_the_kind_is_not_installed() -> Result<()> {
    let config = Config {
        custom_resources: false,
        ..Config::default()
    };
    let Some(c) = Cluster::start_with(
        "without_custom_resources_kubectl_says_the_kind_is_not_installed",
        config,
    )?
    else {
        return Ok(());
    };
    let f = examples().join("block-cloud-metadata.yaml");
    // Validation first (it finds no schema: this server has no OpenAPI v2),
    // then, without it, the mapping: what kubectl says on a cluster without
    // the CRD.
    let out = c.run(&["apply", "-f", path_str(&f)?])?;
    assert!(!out.status.success());
    let out = c.run(&["apply", "--validate=false", "-f", path_str(&f)?])?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no matches for kind \"ClusterNetworkPolicy\"")
            && stderr.contains("ensure CRDs are installed first"),
        "{stderr}"
    );
    assert!(c.server.names("clusternetworkpolicies").is_empty());
    Ok(())
}

#[test]
fn discovery_lists_the_kind_as_cluster_scoped_in_v1alpha2() -> Result<()> {
    let server = Server::start("127.0.0.1:0".parse()?)?;
    let list = common::get(server.addr(), "/apis/policy.networking.k8s.io/v1alpha2")?.json()?;
    assert_eq!(list["groupVersion"], "policy.networking.k8s.io/v1alpha2");
    assert_eq!(list["resources"][0]["name"], "clusternetworkpolicies");
    assert_eq!(list["resources"][0]["namespaced"], false);
    assert_eq!(list["resources"][0]["shortNames"], json!(["cnp"]));
    let group = common::get(server.addr(), "/apis/policy.networking.k8s.io")?.json()?;
    assert_eq!(group["preferredVersion"]["version"], "v1alpha2");
    let agg = common::request_with(
        server.addr(),
        "GET",
        "/apis",
        "",
        "",
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList",
    )?
    .json()?;
    let item = agg["items"]
        .as_array()
        .context("items")?
        .iter()
        .find(|g| g["metadata"]["name"] == "policy.networking.k8s.io")
        .context("the group in aggregated discovery")?;
    assert_eq!(item["versions"][0]["version"], "v1alpha2");
    assert_eq!(item["versions"][0]["resources"][0]["scope"], "Cluster");
    let index = common::get(server.addr(), "/openapi/v3")?.json()?;
    assert!(
        index["paths"]["apis/policy.networking.k8s.io/v1alpha2"].is_object(),
        "{index}"
    );
    Ok(())
}
