//! kube-rs against the server, the way Sluice's agent uses it: a client from
//! the written kubeconfig, typed create/patch/delete, and runtime watchers
//! (list-then-watch and streaming lists) with selectors.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Node, Pod},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::watcher,
};
use serde_json::json;
use sluice_test_apiserver::{Server, ServerHandle};

async fn client(server: &ServerHandle) -> Result<Client> {
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig())?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn pod(name: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}
    }))?)
}

/// The next watcher event, described as `Kind(name)`, skipping nothing.
async fn next<K: kube::Resource>(
    stream: &mut (impl Stream<Item = watcher::Result<watcher::Event<K>>> + Unpin),
) -> Result<String> {
    let ev = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .context("no watcher event within 5s")?
        .context("the watcher ended")??;
    let name = |o: &K| o.meta().name.clone().unwrap_or_default();
    Ok(match ev {
        watcher::Event::Init => "Init".into(),
        watcher::Event::InitApply(o) => format!("InitApply({})", name(&o)),
        watcher::Event::InitDone => "InitDone".into(),
        watcher::Event::Apply(o) => format!("Apply({})", name(&o)),
        watcher::Event::Delete(o) => format!("Delete({})", name(&o)),
    })
}

async fn watcher_follows_pods(config: watcher::Config) -> Result<()> {
    let server = Server::start("127.0.0.1:0".parse()?)?;
    let client = client(&server).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod("first")?).await?;

    let mut stream = watcher(Api::<Pod>::all(client), config).boxed();
    for want in ["Init", "InitApply(first)", "InitDone"] {
        assert_eq!(next(&mut stream).await?, want);
    }
    pods.create(&PostParams::default(), &pod("second")?).await?;
    assert_eq!(next(&mut stream).await?, "Apply(second)");

    let status = json!({"status": {"podIP": "10.0.0.2", "podIPs": [{"ip": "10.0.0.2"}]}});
    let patched = pods
        .patch_status("second", &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    assert_eq!(
        patched.status.and_then(|s| s.pod_ip).as_deref(),
        Some("10.0.0.2")
    );
    assert_eq!(next(&mut stream).await?, "Apply(second)");

    pods.delete("second", &DeleteParams::default()).await?;
    assert_eq!(next(&mut stream).await?, "Delete(second)");
    Ok(())
}

#[tokio::test]
async fn a_kube_rs_watcher_lists_then_follows_creates_status_patches_and_deletes() -> Result<()> {
    watcher_follows_pods(watcher::Config::default()).await
}

#[tokio::test]
async fn a_kube_rs_watcher_with_streaming_lists_gets_the_initial_state_from_the_watch() -> Result<()>
{
    watcher_follows_pods(watcher::Config::default().streaming_lists()).await
}

#[tokio::test]
async fn a_kube_rs_node_watcher_with_a_name_selector_sees_only_its_node() -> Result<()> {
    let server = Server::start("127.0.0.1:0".parse()?)?;
    let client = client(&server).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let mut stream = watcher(
        nodes.clone(),
        watcher::Config::default().fields("metadata.name=n2"),
    )
    .boxed();
    for want in ["Init", "InitDone"] {
        assert_eq!(next(&mut stream).await?, want);
    }
    for name in ["n1", "n2"] {
        let node: Node = serde_json::from_value(json!({"metadata": {"name": name}}))?;
        nodes.create(&PostParams::default(), &node).await?;
    }
    assert_eq!(next(&mut stream).await?, "Apply(n2)");
    if let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(300), stream.next()).await {
        bail!("unexpected event {:?}", ev.map(|e| format!("{e:?}")));
    }

    // Typed round trip of a NetworkPolicy, with the server's defaults.
    let np: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": "deny"},
        "spec": {"podSelector": {}, "egress": [{"ports": [{"port": 53}]}]}
    }))?;
    let created = Api::<NetworkPolicy>::namespaced(client, "default")
        .create(&PostParams::default(), &np)
        .await?;
    let spec = created.spec.context("spec")?;
    assert_eq!(
        spec.policy_types,
        Some(vec!["Ingress".to_string(), "Egress".to_string()])
    );
    Ok(())
}
