//! The API over plain HTTP: watch semantics (resourceVersion replay, 410
//! Gone, bookmarks, timeouts), CRUD status codes, patches, discovery, and
//! the binary.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use common::{Watch, create_pod, get, pod, post, request, request_with, rv_of, summary};
use serde_json::{Value, json};
use sluice_test_apiserver::{Config, Server, ServerHandle};

fn server() -> Result<ServerHandle> {
    Server::start("127.0.0.1:0".parse()?)
}

fn server_with(f: impl FnOnce(&mut Config)) -> Result<ServerHandle> {
    let mut c = Config::default();
    f(&mut c);
    Server::start_with(c)
}

fn names(ev: &[(String, String)]) -> Vec<(&str, &str)> {
    ev.iter().map(|(t, n)| (t.as_str(), n.as_str())).collect()
}

#[test]
fn a_watch_from_a_resource_version_replays_exactly_the_later_events_then_follows_live() -> Result<()>
{
    let s = server()?;
    let a = s.addr();
    let start = create_pod(a, "p1", &json!({}))?;
    create_pod(a, "p2", &json!({}))?;
    let r = request(
        a,
        "PATCH",
        "/api/v1/namespaces/default/pods/p1",
        "application/merge-patch+json",
        r#"{"metadata":{"labels":{"x":"1"}}}"#,
    )?;
    ensure!(r.code == 200, "{}", r.body);
    ensure!(
        request(
            a,
            "DELETE",
            "/api/v1/namespaces/default/pods/p2",
            "application/json",
            ""
        )?
        .code
            == 200
    );
    // Another kind's events are not part of a pod watch.
    ensure!(
        post(
            a,
            "/api/v1/namespaces",
            &json!({"metadata": {"name": "other"}})
        )?
        .code
            == 201
    );

    let mut w = Watch::open(
        a,
        &format!("/api/v1/namespaces/default/pods?watch=1&resourceVersion={start}"),
    )?;
    let mut seen = Vec::new();
    let mut rvs = Vec::new();
    for _ in 0..3 {
        let ev = w.next()?;
        rvs.push(rv_of(&ev["object"]));
        seen.push(summary(&ev));
    }
    assert_eq!(
        names(&seen),
        [("ADDED", "p2"), ("MODIFIED", "p1"), ("DELETED", "p2")]
    );
    assert!(
        rvs.windows(2).all(|w| w[0] < w[1]),
        "resourceVersions increase: {rvs:?}"
    );
    assert!(rvs[0] > start);
    w.expect_quiet(Duration::from_millis(300))?;

    let live = create_pod(a, "p3", &json!({}))?;
    let ev = w.next()?;
    assert_eq!(summary(&ev), ("ADDED".into(), "p3".into()));
    assert_eq!(rv_of(&ev["object"]), live);
    Ok(())
}

#[test]
fn a_watch_from_a_compacted_resource_version_gets_410_gone_as_an_error_event() -> Result<()> {
    let s = server_with(|c| c.history_limit = 3)?;
    let a = s.addr();
    let first = create_pod(a, "p0", &json!({}))?;
    for i in 1..6 {
        create_pod(a, &format!("p{i}"), &json!({}))?;
    }
    let mut w = Watch::open(
        a,
        &format!("/api/v1/pods?watch=true&resourceVersion={first}"),
    )?;
    assert_eq!(
        w.code, 200,
        "the real server answers 200 and sends the error as an event"
    );
    let ev = w.next()?;
    assert_eq!(ev["type"], "ERROR");
    let status = &ev["object"];
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["apiVersion"], "v1");
    assert_eq!(status["status"], "Failure");
    assert_eq!(status["code"], 410);
    assert_eq!(status["reason"], "Expired");
    assert!(
        status["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("too old resource version")
    );
    assert!(
        w.next_within(Duration::from_secs(2))?.is_none(),
        "the stream ends after the error"
    );

    // Still inside the window: fine.
    let latest = s.with_store(|st| st.resource_version());
    let mut ok = Watch::open(
        a,
        &format!("/api/v1/pods?watch=true&resourceVersion={}", latest - 3),
    )?;
    assert_eq!(summary(&ok.next()?).1, "p3");

    // A compaction (as etcd's) expires everything older than now.
    s.with_store(|st| st.compact());
    let mut gone = Watch::open(
        a,
        &format!("/api/v1/pods?watch=true&resourceVersion={}", latest - 1),
    )?;
    assert_eq!(gone.next()?["object"]["code"], 410);
    Ok(())
}

#[test]
fn watches_that_allow_bookmarks_get_periodic_bookmarks_carrying_the_latest_resource_version()
-> Result<()> {
    let s = server_with(|c| c.bookmark_interval = Duration::from_millis(200))?;
    let a = s.addr();
    let now = s.with_store(|st| st.resource_version());
    let mut w = Watch::open(
        a,
        &format!("/api/v1/pods?watch=1&allowWatchBookmarks=true&resourceVersion={now}"),
    )?;
    let b = w.next()?;
    assert_eq!(b["type"], "BOOKMARK");
    assert_eq!(b["object"]["kind"], "Pod");
    assert_eq!(b["object"]["apiVersion"], "v1");
    assert_eq!(rv_of(&b["object"]), now);

    // Events of other kinds advance the resourceVersion bookmarks report.
    ensure!(
        post(
            a,
            "/api/v1/namespaces",
            &json!({"metadata": {"name": "n1"}})
        )?
        .code
            == 201
    );
    let created = create_pod(a, "p", &json!({}))?;
    let mut got_pod = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        ensure!(Instant::now() < deadline, "no bookmark after the pod");
        let ev = w.next()?;
        match ev["type"].as_str() {
            Some("ADDED") => got_pod = true,
            Some("BOOKMARK") if got_pod => {
                assert_eq!(rv_of(&ev["object"]), created);
                break;
            }
            _ => {}
        }
    }

    let mut plain = Watch::open(
        a,
        &format!("/api/v1/pods?watch=1&resourceVersion={created}"),
    )?;
    plain.expect_quiet(Duration::from_millis(700))?;
    Ok(())
}

#[test]
fn a_watch_ends_when_its_timeout_seconds_pass() -> Result<()> {
    let s = server()?;
    let now = s.with_store(|st| st.resource_version());
    let started = Instant::now();
    let mut w = Watch::open(
        s.addr(),
        &format!("/api/v1/pods?watch=1&timeoutSeconds=1&resourceVersion={now}"),
    )?;
    assert!(w.next_within(Duration::from_secs(5))?.is_none());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    Ok(())
}

#[test]
fn a_watch_without_a_resource_version_starts_with_the_current_objects() -> Result<()> {
    let s = server()?;
    let a = s.addr();
    create_pod(a, "a", &json!({}))?;
    create_pod(a, "b", &json!({}))?;
    let mut w = Watch::open(a, "/api/v1/namespaces/default/pods?watch=1")?;
    assert_eq!(summary(&w.next()?), ("ADDED".into(), "a".into()));
    assert_eq!(summary(&w.next()?), ("ADDED".into(), "b".into()));
    w.expect_quiet(Duration::from_millis(200))?;

    let mut streaming = Watch::open(
        a,
        "/api/v1/namespaces/default/pods?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true",
    )?;
    assert_eq!(summary(&streaming.next()?).1, "a");
    assert_eq!(summary(&streaming.next()?).1, "b");
    let end = streaming.next()?;
    assert_eq!(end["type"], "BOOKMARK");
    assert_eq!(
        end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    Ok(())
}

#[test]
fn a_watch_with_a_label_selector_sees_objects_enter_as_added_and_leave_as_deleted() -> Result<()> {
    let s = server()?;
    let a = s.addr();
    let now = create_pod(a, "p", &json!({"app": "web"}))?;
    let mut w = Watch::open(
        a,
        &format!("/api/v1/pods?watch=1&labelSelector=app%3Ddb&resourceVersion={now}"),
    )?;
    for app in ["db", "web"] {
        let patch = json!({"metadata": {"labels": {"app": app}}}).to_string();
        let r = request(
            a,
            "PATCH",
            "/api/v1/namespaces/default/pods/p",
            "application/strategic-merge-patch+json",
            &patch,
        )?;
        ensure!(r.code == 200, "{}", r.body);
    }
    assert_eq!(summary(&w.next()?), ("ADDED".into(), "p".into()));
    let left = w.next()?;
    assert_eq!(summary(&left), ("DELETED".into(), "p".into()));
    assert_eq!(left["object"]["metadata"]["labels"]["app"], "web");
    Ok(())
}

#[test]
fn a_watch_with_a_name_field_selector_sees_only_that_object() -> Result<()> {
    let s = server()?;
    let a = s.addr();
    let now = s.with_store(|st| st.resource_version());
    let mut w = Watch::open(
        a,
        &format!("/api/v1/pods?watch=1&fieldSelector=metadata.name%3Db&resourceVersion={now}"),
    )?;
    create_pod(a, "a", &json!({}))?;
    create_pod(a, "b", &json!({}))?;
    assert_eq!(summary(&w.next()?), ("ADDED".into(), "b".into()));
    w.expect_quiet(Duration::from_millis(200))?;
    Ok(())
}

#[test]
fn errors_are_status_objects_with_the_right_codes_and_reasons() -> Result<()> {
    let s = server()?;
    let a = s.addr();
    let check = |r: common::Resp, code: u16, reason: &str| -> Result<()> {
        let body = r.json()?;
        ensure!(r.code == code, "wanted {code}, got {} {}", r.code, r.body);
        ensure!(
            body["kind"] == "Status" && body["code"] == code && body["reason"] == reason,
            "{body}"
        );
        Ok(())
    };
    check(
        get(a, "/api/v1/namespaces/default/pods/nope")?,
        404,
        "NotFound",
    )?;
    create_pod(a, "p", &json!({}))?;
    check(
        post(a, "/api/v1/namespaces/default/pods", &pod("p", &json!({})))?,
        409,
        "AlreadyExists",
    )?;
    check(
        post(a, "/api/v1/namespaces/missing/pods", &pod("q", &json!({})))?,
        404,
        "NotFound",
    )?;
    check(
        post(
            a,
            "/api/v1/namespaces/default/pods",
            &pod("Not_A_Name", &json!({})),
        )?,
        422,
        "Invalid",
    )?;
    let no_containers = json!({"metadata": {"name": "e"}, "spec": {"containers": []}});
    check(
        post(a, "/api/v1/namespaces/default/pods", &no_containers)?,
        422,
        "Invalid",
    )?;
    check(
        request(
            a,
            "POST",
            "/api/v1/namespaces/default/pods",
            "application/json",
            "{not json",
        )?,
        400,
        "BadRequest",
    )?;
    let mut wrong_ns = pod("w", &json!({}));
    wrong_ns["metadata"]["namespace"] = json!("kube-system");
    check(
        post(a, "/api/v1/namespaces/default/pods", &wrong_ns)?,
        400,
        "BadRequest",
    )?;
    check(
        get(a, "/api/v1/pods?labelSelector=a+in+b")?,
        400,
        "BadRequest",
    )?;
    check(
        get(a, "/api/v1/namespaces/default/widgets")?,
        404,
        "NotFound",
    )?;
    check(
        request(
            a,
            "PATCH",
            "/api/v1/namespaces/default/pods/p",
            "application/apply-patch+yaml",
            "{}",
        )?,
        415,
        "UnsupportedMediaType",
    )?;

    // Optimistic concurrency: a stale resourceVersion conflicts.
    let current = get(a, "/api/v1/namespaces/default/pods/p")?.json()?;
    let mut newer = current.clone();
    newer["metadata"]["labels"] = json!({"v": "2"});
    let r = request(
        a,
        "PUT",
        "/api/v1/namespaces/default/pods/p",
        "application/json",
        &newer.to_string(),
    )?;
    ensure!(r.code == 200, "{}", r.body);
    let mut stale = current;
    stale["metadata"]["labels"] = json!({"v": "3"});
    check(
        request(
            a,
            "PUT",
            "/api/v1/namespaces/default/pods/p",
            "application/json",
            &stale.to_string(),
        )?,
        409,
        "Conflict",
    )?;
    let stale_patch =
        json!({"metadata": {"resourceVersion": "1", "labels": {"v": "4"}}}).to_string();
    check(
        request(
            a,
            "PATCH",
            "/api/v1/namespaces/default/pods/p",
            "application/merge-patch+json",
            &stale_patch,
        )?,
        409,
        "Conflict",
    )?;
    assert_eq!(
        get(a, "/api/v1/namespaces/default/pods/p")?.json()?["metadata"]["labels"]["v"],
        "2"
    );
    Ok(())
}

#[test]
fn pod_ips_are_set_only_through_the_status_subresource() -> Result<()> {
    let s = server()?;
    let a = s.addr();
    create_pod(a, "p", &json!({}))?;
    let mut with_ip = get(a, "/api/v1/namespaces/default/pods/p")?.json()?;
    with_ip["status"] =
        json!({"phase": "Running", "podIP": "10.0.0.7", "podIPs": [{"ip": "10.0.0.7"}]});
    let r = request(
        a,
        "PUT",
        "/api/v1/namespaces/default/pods/p",
        "application/json",
        &with_ip.to_string(),
    )?;
    assert_eq!(r.json()?["status"], json!({"phase": "Pending"}));

    let r = request(
        a,
        "PUT",
        "/api/v1/namespaces/default/pods/p/status",
        "application/json",
        &with_ip.to_string(),
    )?;
    ensure!(r.code == 200, "{}", r.body);
    assert_eq!(
        s.get("pods", "default", "p").context("pod")?["status"]["podIP"],
        "10.0.0.7"
    );

    let patch = json!({"status": {"podIPs": [{"ip": "fd00::7"}]}}).to_string();
    let r = request(
        a,
        "PATCH",
        "/api/v1/namespaces/default/pods/p/status",
        "application/strategic-merge-patch+json",
        &patch,
    )?;
    ensure!(r.code == 200, "{}", r.body);
    assert_eq!(
        r.json()?["status"]["podIPs"],
        json!([{"ip": "10.0.0.7"}, {"ip": "fd00::7"}]),
        "podIPs merge by ip"
    );
    Ok(())
}

#[test]
fn merge_json_and_strategic_patches_all_apply() -> Result<()> {
    let s = server()?;
    let a = s.addr();
    create_pod(a, "p", &json!({"app": "web"}))?;
    let path = "/api/v1/namespaces/default/pods/p";
    let r = request(
        a,
        "PATCH",
        path,
        "application/json-patch+json",
        r#"[{"op":"add","path":"/metadata/labels/j","value":"1"}]"#,
    )?;
    ensure!(r.code == 200, "{}", r.body);
    let r = request(
        a,
        "PATCH",
        path,
        "application/merge-patch+json",
        r#"{"metadata":{"labels":{"app":null}}}"#,
    )?;
    ensure!(r.code == 200, "{}", r.body);
    let smp = r#"{"spec":{"containers":[{"name":"sidecar","image":"envoy"}]}}"#;
    let r = request(
        a,
        "PATCH",
        path,
        "application/strategic-merge-patch+json",
        smp,
    )?;
    ensure!(r.code == 200, "{}", r.body);
    let p = r.json()?;
    assert_eq!(p["metadata"]["labels"], json!({"j": "1"}));
    let containers: Vec<&str> = p["spec"]["containers"]
        .as_array()
        .context("containers")?
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(containers, ["c", "sidecar"]);
    let r = request(
        a,
        "PATCH",
        path,
        "application/json-patch+json",
        r#"[{"op":"test","path":"/metadata/labels/j","value":"2"}]"#,
    )?;
    assert_eq!(r.code, 422);
    Ok(())
}

#[test]
fn lists_carry_the_latest_resource_version_and_honour_selectors() -> Result<()> {
    let s = server()?;
    let a = s.addr();
    create_pod(a, "a", &json!({"app": "web"}))?;
    create_pod(a, "b", &json!({"app": "db"}))?;
    ensure!(
        post(
            a,
            "/api/v1/namespaces",
            &json!({"metadata": {"name": "n2"}})
        )?
        .code
            == 201
    );
    let list = get(a, "/api/v1/pods")?.json()?;
    assert_eq!(list["kind"], "PodList");
    assert_eq!(rv_of(&list), s.with_store(|st| st.resource_version()));
    let pods = |q: &str| -> Result<Vec<String>> {
        Ok(get(a, &format!("/api/v1/pods?{q}"))?.json()?["items"]
            .as_array()
            .context("items")?
            .iter()
            .filter_map(|p| p["metadata"]["name"].as_str().map(String::from))
            .collect())
    };
    assert_eq!(pods("labelSelector=app%3Dweb")?, ["a"]);
    assert_eq!(pods("labelSelector=app+notin+%28web%29")?, ["b"]);
    assert_eq!(pods("fieldSelector=metadata.name%3Db")?, ["b"]);
    assert_eq!(
        pods("fieldSelector=metadata.namespace%3Dkube-system")?,
        Vec::<String>::new()
    );
    Ok(())
}

#[test]
fn deleting_a_namespace_deletes_its_objects_and_watchers_see_them_go() -> Result<()> {
    let s = server()?;
    let a = s.addr();
    ensure!(
        post(
            a,
            "/api/v1/namespaces",
            &json!({"metadata": {"name": "demo"}})
        )?
        .code
            == 201
    );
    ensure!(post(a, "/api/v1/namespaces/demo/pods", &pod("p", &json!({})))?.code == 201);
    let np = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "deny"}, "spec": {"podSelector": {}}});
    ensure!(
        post(
            a,
            "/apis/networking.k8s.io/v1/namespaces/demo/networkpolicies",
            &np
        )?
        .code
            == 201
    );
    let now = s.with_store(|st| st.resource_version());
    let mut w = Watch::open(a, &format!("/api/v1/pods?watch=1&resourceVersion={now}"))?;
    let r = request(
        a,
        "DELETE",
        "/api/v1/namespaces/demo",
        "application/json",
        "",
    )?;
    ensure!(r.code == 200, "{}", r.body);
    assert_eq!(summary(&w.next()?), ("DELETED".into(), "p".into()));
    assert!(s.names("pods").is_empty());
    assert!(s.names("networkpolicies").is_empty());
    assert!(!s.names("namespaces").contains(&"demo".to_string()));
    Ok(())
}

#[test]
fn discovery_serves_legacy_and_aggregated_documents() -> Result<()> {
    let s = server()?;
    let a = s.addr();
    assert_eq!(get(a, "/api")?.json()?["versions"], json!(["v1"]));
    let agg = request_with(
        a,
        "GET",
        "/apis",
        "",
        "",
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json",
    )?;
    assert!(
        agg.header("content-type")
            .unwrap_or_default()
            .contains("as=APIGroupDiscoveryList")
    );
    let groups: Vec<String> = agg.json()?["items"]
        .as_array()
        .context("items")?
        .iter()
        .filter_map(|g| g["metadata"]["name"].as_str().map(String::from))
        .collect();
    assert_eq!(
        groups,
        [
            "networking.k8s.io",
            "discovery.k8s.io",
            "policy.networking.k8s.io",
            "events.k8s.io"
        ]
    );
    let core = get(a, "/api/v1")?.json()?;
    let resources: Vec<&str> = core["resources"]
        .as_array()
        .context("resources")?
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert!(
        resources.contains(&"pods") && resources.contains(&"pods/status"),
        "{resources:?}"
    );
    assert_eq!(
        get(a, "/apis/discovery.k8s.io/v1")?.json()?["resources"][0]["kind"],
        "EndpointSlice"
    );
    assert_eq!(get(a, "/version")?.json()?["minor"], "32");
    let table = request_with(
        a,
        "GET",
        "/api/v1/namespaces",
        "",
        "",
        "application/json;as=Table;v=v1;g=meta.k8s.io",
    )?
    .json()?;
    assert_eq!(table["kind"], "Table");
    assert_eq!(table["rows"][0]["cells"][0], "default");
    Ok(())
}

#[test]
fn endpoint_slices_and_nodes_round_trip() -> Result<()> {
    let s = server()?;
    let a = s.addr();
    let node = json!({"metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}});
    ensure!(post(a, "/api/v1/nodes", &node)?.code == 201);
    assert_eq!(
        s.get("nodes", "", "n1").context("node")?["status"]["addresses"][0]["address"],
        "192.0.2.1"
    );
    let slice = json!({
        "metadata": {"name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.0.1"]}],
        "ports": [{"port": 80}]
    });
    let r = post(
        a,
        "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
        &slice,
    )?;
    ensure!(r.code == 201, "{}", r.body);
    assert_eq!(r.json()?["ports"][0]["protocol"], "TCP");
    let mut bad = slice;
    bad["metadata"]["name"] = json!("other");
    bad.as_object_mut().context("object")?.remove("addressType");
    assert_eq!(
        post(
            a,
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
            &bad
        )?
        .code,
        422
    );
    Ok(())
}

#[test]
fn generate_name_and_dry_run_behave_like_the_real_server() -> Result<()> {
    let s = server()?;
    let a = s.addr();
    let r = post(
        a,
        "/api/v1/namespaces/default/pods",
        &json!({"metadata": {"generateName": "web-"}, "spec": pod("x", &json!({}))["spec"]}),
    )?;
    ensure!(r.code == 201, "{}", r.body);
    let name = r.json()?["metadata"]["name"]
        .as_str()
        .context("name")?
        .to_string();
    assert!(name.starts_with("web-") && name.len() == 9, "{name}");
    let before = s.with_store(|st| st.resource_version());
    let r = post(
        a,
        "/api/v1/namespaces/default/pods?dryRun=All",
        &pod("dry", &json!({})),
    )?;
    assert_eq!(r.code, 201);
    assert!(s.get("pods", "default", "dry").is_none());
    assert_eq!(s.with_store(|st| st.resource_version()), before);
    Ok(())
}

#[test]
fn the_server_refuses_to_listen_beyond_loopback() -> Result<()> {
    assert!(Server::start("0.0.0.0:0".parse()?).is_err());
    Ok(())
}

#[test]
fn the_binary_prints_its_url_first_and_writes_a_kubeconfig() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kc = dir.path().join("kubeconfig");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-test-apiserver"))
        .args(["--listen", "127.0.0.1:0", "--kubeconfig-out"])
        .arg(&kc)
        .stdout(Stdio::piped())
        .spawn()?;
    let result = (|| -> Result<()> {
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let url = line.trim();
        let addr = url
            .strip_prefix("http://")
            .context("an http URL")?
            .parse()?;
        let version: Value = get(addr, "/version")?.json()?;
        assert_eq!(version["major"], "1");
        let config = std::fs::read_to_string(&kc)?;
        assert!(config.contains(&format!("server: {url}")), "{config}");
        Ok(())
    })();
    child.kill()?;
    child.wait()?;
    result
}

/// Follows a paged list from `path` (which has `limit=`): every page's
/// names, and the resourceVersion each page reported.
fn pages(addr: std::net::SocketAddr, path: &str) -> Result<Vec<(Vec<String>, String)>> {
    let mut out = Vec::new();
    let mut next = String::new();
    loop {
        let url = if next.is_empty() {
            path.to_string()
        } else {
            format!("{path}&continue={next}")
        };
        let r = get(addr, &url)?;
        ensure!(r.code == 200, "{url}: {} {}", r.code, r.body);
        let v = r.json()?;
        let names = v["items"]
            .as_array()
            .context("items")?
            .iter()
            .map(|o| {
                o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        let rv = v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        out.push((names, rv));
        match v["metadata"]["continue"].as_str() {
            Some(t) => next = t.to_string(),
            None => return Ok(out),
        }
    }
}

#[test]
fn lists_with_a_limit_come_in_pages_that_continue_where_the_last_ended() -> Result<()> {
    let s = server_with(|c| c.history_limit = 20)?;
    let addr = s.addr();
    for i in 0..7 {
        let role = if i % 2 == 0 { "even" } else { "odd" };
        create_pod(addr, &format!("p{i}"), &json!({"role": role}))?;
    }
    let all = pages(addr, "/api/v1/namespaces/default/pods?limit=3")?;
    let names: Vec<Vec<&str>> = all
        .iter()
        .map(|(n, _)| n.iter().map(String::as_str).collect())
        .collect();
    assert_eq!(
        names,
        [vec!["p0", "p1", "p2"], vec!["p3", "p4", "p5"], vec!["p6"]]
    );
    assert!(
        all.iter().all(|(_, rv)| *rv == all[0].1),
        "one resourceVersion for the whole list: {all:?}"
    );
    // A selector filters before the pages are cut; an exact fit ends
    // without a continue token.
    let even = pages(addr, "/api/v1/pods?labelSelector=role%3Deven&limit=2")?;
    assert_eq!(
        even.iter().map(|(n, _)| n.len()).collect::<Vec<_>>(),
        [2, 2]
    );
    // A change between pages shows in a later page and in the watch from
    // the list's resourceVersion.
    let first = get(addr, "/api/v1/namespaces/default/pods?limit=4")?.json()?;
    let token = first["metadata"]["continue"]
        .as_str()
        .context("token")?
        .to_string();
    create_pod(addr, "p9", &json!({"role": "odd"}))?;
    let rest = get(
        addr,
        &format!("/api/v1/namespaces/default/pods?limit=4&continue={token}"),
    )?
    .json()?;
    let rest_names: Vec<&str> = rest["items"]
        .as_array()
        .context("items")?
        .iter()
        .filter_map(|o| o["metadata"]["name"].as_str())
        .collect();
    assert_eq!(rest_names, ["p4", "p5", "p6", "p9"]);
    assert_eq!(
        rest["metadata"]["resourceVersion"],
        first["metadata"]["resourceVersion"]
    );
    // Tokens that are not ours are a 400; one older than the history a 410.
    let bad = get(addr, "/api/v1/pods?limit=2&continue=zz")?;
    assert_eq!(bad.code, 400, "{}", bad.body);
    for i in 0..25 {
        create_pod(addr, &format!("q{i}"), &json!({}))?;
    }
    let old = get(
        addr,
        &format!("/api/v1/namespaces/default/pods?limit=4&continue={token}"),
    )?;
    assert_eq!(old.code, 410, "{}", old.body);
    // Without a limit the list is whole, as before.
    let whole = get(addr, "/api/v1/pods")?.json()?;
    assert_eq!(whole["items"].as_array().map(Vec::len), Some(33));
    assert!(whole["metadata"].get("continue").is_none());
    Ok(())
}
