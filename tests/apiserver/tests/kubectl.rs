//! The real kubectl against the server: apply, create, replace, delete, get
//! (tables, -o json/yaml, -A, -l) and get -w, with multi-document YAML files
//! of Namespaces, Pods, NetworkPolicies and Services. Each test skips (and
//! says so) where kubectl is not installed.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use common::kubectl::{Cluster, path_str};
use serde_json::{Value, json};

const V1: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: demo
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: demo
  labels:
    app: web
spec:
  containers:
  - name: nginx
    image: nginx:1.27
    ports:
    - containerPort: 80
  - name: sidecar
    image: busybox
    args: ["sleep", "infinity"]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-web
  namespace: demo
spec:
  podSelector:
    matchLabels:
      app: web
  ingress:
  - from:
    - podSelector:
        matchLabels:
          role: client
    ports:
    - port: 80
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
spec:
  selector:
    app: web
  ports:
  - port: 80
    targetPort: 8080
"#;

/// V1 with: a new image, a second port, a changed policy peer, a new label.
fn v2() -> String {
    V1.replace("image: nginx:1.27", "image: nginx:1.28")
        .replace(
            "    - containerPort: 80\n",
            "    - containerPort: 80\n    - containerPort: 443\n",
        )
        .replace("role: client", "role: admin")
        .replace(
            "    app: web\nspec:\n  containers",
            "    app: web\n    tier: fe\nspec:\n  containers",
        )
}

fn container(pod: &Value, name: &str) -> Value {
    pod["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .cloned()
        .unwrap_or(Value::Null)
}

fn ports(c: &Value) -> Vec<u64> {
    c["ports"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p["containerPort"].as_u64())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn kubectl_apply_creates_every_object_of_a_multi_document_file() -> Result<()> {
    let Some(c) = Cluster::start("kubectl_apply_creates_every_object_of_a_multi_document_file")?
    else {
        return Ok(());
    };
    let f = c.file("v1.yaml", V1)?;
    let out = c.ok(&["apply", "-f", path_str(&f)?])?;
    for line in [
        "namespace/demo created",
        "pod/web created",
        "networkpolicy.networking.k8s.io/allow-web created",
        "service/web created",
    ] {
        assert!(out.contains(line), "{line:?} missing from:\n{out}");
    }
    assert!(c.server.names("namespaces").contains(&"demo".to_string()));
    assert_eq!(c.server.names("pods"), ["demo/web"]);
    assert_eq!(c.server.names("networkpolicies"), ["demo/allow-web"]);
    assert_eq!(c.server.names("services"), ["demo/web"]);
    let web = c.obj("pods", "web")?;
    assert_eq!(container(&web, "nginx")["image"], "nginx:1.27");
    assert!(
        web["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .is_string(),
        "kubectl apply records what it applied"
    );
    let np = c.obj("networkpolicies", "allow-web")?;
    assert_eq!(
        np["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["role"],
        "client"
    );
    assert_eq!(np["spec"]["policyTypes"], json!(["Ingress"]));
    Ok(())
}

#[test]
fn kubectl_apply_of_a_changed_file_merges_containers_by_name_and_ports_by_container_port()
-> Result<()> {
    let Some(c) = Cluster::start(
        "kubectl_apply_of_a_changed_file_merges_containers_by_name_and_ports_by_container_port",
    )?
    else {
        return Ok(());
    };
    let f1 = c.file("v1.yaml", V1)?;
    let f2 = c.file("v2.yaml", &v2())?;
    c.ok(&["apply", "-f", path_str(&f1)?])?;
    c.set_pod_ip("web", "10.1.0.5")?;
    // A label someone else added is not in the applied file; apply keeps it.
    c.ok(&["label", "pod", "web", "-n", "demo", "owner=ops"])?;
    let cluster_ip = c.obj("services", "web")?["spec"]["clusterIP"].clone();

    let out = c.ok(&["apply", "-f", path_str(&f2)?])?;
    assert!(out.contains("pod/web configured"), "{out}");
    assert!(out.contains("namespace/demo unchanged"), "{out}");
    let web = c.obj("pods", "web")?;
    assert_eq!(container(&web, "nginx")["image"], "nginx:1.28");
    assert_eq!(ports(&container(&web, "nginx")), [80, 443]);
    assert_eq!(
        container(&web, "sidecar")["args"],
        json!(["sleep", "infinity"])
    );
    assert_eq!(
        web["metadata"]["labels"],
        json!({"app": "web", "tier": "fe", "owner": "ops"})
    );
    assert_eq!(
        web["status"]["podIP"], "10.1.0.5",
        "apply does not touch the status"
    );
    let np = c.obj("networkpolicies", "allow-web")?;
    assert_eq!(
        np["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"],
        json!({"role": "admin"})
    );
    assert_eq!(c.obj("services", "web")?["spec"]["clusterIP"], cluster_ip);

    // Back to v1: what v2 added goes away, what others added stays.
    c.ok(&["apply", "-f", path_str(&f1)?])?;
    let web = c.obj("pods", "web")?;
    assert_eq!(container(&web, "nginx")["image"], "nginx:1.27");
    assert_eq!(ports(&container(&web, "nginx")), [80]);
    assert_eq!(
        web["metadata"]["labels"],
        json!({"app": "web", "owner": "ops"})
    );

    // Applying the same file again changes nothing.
    let rv = web["metadata"]["resourceVersion"].clone();
    let out = c.ok(&["apply", "-f", path_str(&f1)?])?;
    assert!(out.contains("pod/web unchanged"), "{out}");
    assert_eq!(c.obj("pods", "web")?["metadata"]["resourceVersion"], rv);
    Ok(())
}

#[test]
fn kubectl_create_creates_objects_and_refuses_ones_that_exist() -> Result<()> {
    let Some(c) = Cluster::start("kubectl_create_creates_objects_and_refuses_ones_that_exist")?
    else {
        return Ok(());
    };
    let f = c.file("v1.yaml", V1)?;
    let out = c.ok(&["create", "-f", path_str(&f)?])?;
    assert!(
        out.contains("pod/web created") && out.contains("service/web created"),
        "{out}"
    );
    assert!(
        c.obj("pods", "web")?["metadata"]["annotations"].is_null(),
        "create records no last-applied configuration"
    );
    let again = c.run(&["create", "-f", path_str(&f)?])?;
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains(r#"Error from server (AlreadyExists): error when creating"#),
        "{err}"
    );
    assert!(err.contains(r#"pods "web" already exists"#), "{err}");
    Ok(())
}

#[test]
fn kubectl_replace_swaps_whole_objects_but_keeps_status_and_cluster_ip() -> Result<()> {
    let Some(c) =
        Cluster::start("kubectl_replace_swaps_whole_objects_but_keeps_status_and_cluster_ip")?
    else {
        return Ok(());
    };
    c.ok(&["create", "-f", path_str(&c.file("v1.yaml", V1)?)?])?;
    c.set_pod_ip("web", "10.1.0.9")?;
    let ip = c.obj("services", "web")?["spec"]["clusterIP"].clone();
    let out = c.ok(&["replace", "-f", path_str(&c.file("v2.yaml", &v2())?)?])?;
    assert!(
        out.contains("pod/web replaced")
            && out.contains("networkpolicy.networking.k8s.io/allow-web replaced"),
        "{out}"
    );
    let web = c.obj("pods", "web")?;
    assert_eq!(ports(&container(&web, "nginx")), [80, 443]);
    assert_eq!(web["metadata"]["labels"]["tier"], "fe");
    assert_eq!(web["status"]["podIP"], "10.1.0.9");
    assert_eq!(c.obj("services", "web")?["spec"]["clusterIP"], ip);
    assert_eq!(
        c.obj("networkpolicies", "allow-web")?["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
            ["role"],
        "admin"
    );
    let missing = c.run(&[
        "replace",
        "-f",
        path_str(&c.file(
            "other.yaml",
            &V1.replace("name: web\n  namespace", "name: nope\n  namespace"),
        )?)?,
    ])?;
    assert!(
        !missing.status.success(),
        "replace needs the object to exist"
    );
    Ok(())
}

#[test]
fn kubectl_delete_removes_every_object_of_the_file() -> Result<()> {
    let Some(c) = Cluster::start("kubectl_delete_removes_every_object_of_the_file")? else {
        return Ok(());
    };
    let f = c.file("v1.yaml", V1)?;
    c.ok(&["apply", "-f", path_str(&f)?])?;
    let out = c.ok(&["delete", "-f", path_str(&f)?])?;
    for line in [
        r#"namespace "demo" deleted"#,
        r#"pod "web" deleted"#,
        r#"networkpolicy.networking.k8s.io "allow-web" deleted"#,
        r#"service "web" deleted"#,
    ] {
        assert!(out.contains(line), "{line:?} missing from:\n{out}");
    }
    assert!(c.server.names("pods").is_empty());
    assert!(c.server.names("networkpolicies").is_empty());
    assert!(c.server.names("services").is_empty());
    assert!(!c.server.names("namespaces").contains(&"demo".to_string()));
    let again = c.run(&["delete", "-f", path_str(&f)?])?;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("NotFound"));
    Ok(())
}

#[test]
fn kubectl_get_prints_tables_json_and_yaml_across_namespaces_and_by_label() -> Result<()> {
    let Some(c) =
        Cluster::start("kubectl_get_prints_tables_json_and_yaml_across_namespaces_and_by_label")?
    else {
        return Ok(());
    };
    c.ok(&["apply", "-f", path_str(&c.file("v1.yaml", V1)?)?])?;
    c.ok(&[
        "run",
        "other",
        "-n",
        "default",
        "--image=busybox",
        "--labels=app=other",
    ])?;
    c.set_pod_ip("web", "10.1.0.5")?;

    let table = c.ok(&["get", "pods", "-A", "-o", "wide"])?;
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0][..3], ["NAMESPACE", "NAME", "READY"], "{table}");
    assert!(
        lines.iter().any(|l| l[..2] == ["default", "other"]),
        "{table}"
    );
    let web = lines
        .iter()
        .find(|l| l[..2] == ["demo", "web"])
        .context("no web row")?;
    assert!(
        web.contains(&"Running") && web.contains(&"10.1.0.5"),
        "{table}"
    );

    let by_label = c.ok(&["get", "pods", "-A", "-l", "app=web", "-o", "name"])?;
    assert_eq!(by_label.trim(), "pod/web");
    let none = c.run(&["get", "pods", "-A", "-l", "app=nothing"])?;
    assert!(String::from_utf8_lossy(&none.stderr).contains("No resources found"));

    let list: Value = serde_json::from_str(&c.ok(&["get", "netpol", "-n", "demo", "-o", "json"])?)?;
    assert_eq!(list["items"][0]["metadata"]["name"], "allow-web");
    assert_eq!(
        list["items"][0]["spec"]["podSelector"]["matchLabels"]["app"],
        "web"
    );
    let one: Value =
        serde_json::from_str(&c.ok(&["get", "pod", "web", "-n", "demo", "-o", "json"])?)?;
    assert_eq!(one["status"]["podIP"], "10.1.0.5");

    let yaml = c.ok(&["get", "service", "web", "-n", "demo", "-o", "yaml"])?;
    let ip = c.obj("services", "web")?["spec"]["clusterIP"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        yaml.contains("kind: Service") && yaml.contains(&format!("clusterIP: {ip}")),
        "{yaml}"
    );
    let svc = c.ok(&["get", "svc", "-n", "demo"])?;
    assert!(
        svc.lines()
            .any(|l| l.starts_with("web") && l.contains(&ip) && l.contains("80/TCP")),
        "{svc}"
    );
    let ns = c.ok(&["get", "ns", "demo", "--no-headers"])?;
    assert!(ns.starts_with("demo") && ns.contains("Active"), "{ns}");
    Ok(())
}

#[test]
fn kubectl_get_watch_prints_changes_made_after_it_started() -> Result<()> {
    let Some(c) = Cluster::start("kubectl_get_watch_prints_changes_made_after_it_started")? else {
        return Ok(());
    };
    c.ok(&["apply", "-f", path_str(&c.file("v1.yaml", V1)?)?])?;
    let mut child = c
        .command(&["get", "pods", "-n", "demo", "-w"])
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
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if what(&line) => return Ok(line),
                Ok(_) => {}
                Err(_) => bail!("kubectl get -w printed nothing matching in time"),
            }
        }
    };
    let result = (|| -> Result<()> {
        wait_for(&|l| l.starts_with("NAME") && l.contains("STATUS"))?;
        wait_for(&|l| l.starts_with("web ") && l.contains("Pending"))?;
        let late = common::pod("late", &json!({}));
        let r = common::post(c.server.addr(), "/api/v1/namespaces/demo/pods", &late)?;
        ensure!(r.code == 201, "{}", r.body);
        wait_for(&|l| l.starts_with("late ") && l.contains("Pending"))?;
        c.set_pod_ip("web", "10.1.0.5")?;
        wait_for(&|l| l.starts_with("web ") && l.contains("Running"))?;
        Ok(())
    })();
    child.kill()?;
    child.wait()?;
    result
}
