//! Running the real kubectl against a fresh server, through a kubeconfig
//! file in a temporary directory.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};
use sluice_test_apiserver::{Config, Server, ServerHandle, store::Part};
use tempfile::TempDir;

/// The kubectl to run: `$KUBECTL`, else `kubectl` on PATH, if it runs.
fn kubectl_binary() -> Option<PathBuf> {
    let candidate =
        std::env::var_os("KUBECTL").map_or_else(|| PathBuf::from("kubectl"), PathBuf::from);
    let ok = Command::new(&candidate)
        .args(["version", "--client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(candidate)
}

/// A server, and kubectl pointed at it through a kubeconfig file.
pub struct Cluster {
    pub server: ServerHandle,
    kubectl: PathBuf,
    dir: TempDir,
}

impl Cluster {
    /// `None` (after saying so) where kubectl is not installed.
    pub fn start(test: &str) -> Result<Option<Self>> {
        Self::start_with(test, Config::default())
    }

    /// As [`Cluster::start`], with a server configured by `config`.
    pub fn start_with(test: &str, config: Config) -> Result<Option<Self>> {
        let Some(kubectl) = kubectl_binary() else {
            eprintln!("skipping {test}: kubectl not found (set KUBECTL or put it on PATH)");
            return Ok(None);
        };
        let server = Server::start_with(config)?;
        let dir = tempfile::tempdir()?;
        server.write_kubeconfig(&dir.path().join("kubeconfig"))?;
        Ok(Some(Self {
            server,
            kubectl,
            dir,
        }))
    }

    pub fn file(&self, name: &str, content: &str) -> Result<PathBuf> {
        let p = self.dir.path().join(name);
        std::fs::write(&p, content)?;
        Ok(p)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.kubectl);
        c.arg("--kubeconfig")
            .arg(self.dir.path().join("kubeconfig"))
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .args(args);
        c
    }

    pub fn run(&self, args: &[&str]) -> Result<Output> {
        Ok(self.command(args).output()?)
    }

    /// Runs kubectl, requires success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args)?;
        let (stdout, stderr) = (
            String::from_utf8(out.stdout)?,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        ensure!(
            out.status.success(),
            "kubectl {args:?} failed: {stderr}\n{stdout}"
        );
        Ok(stdout)
    }

    pub fn obj(&self, plural: &str, name: &str) -> Result<Value> {
        self.server
            .get(plural, "demo", name)
            .with_context(|| format!("{plural}/{name} is not on the server"))
    }

    /// Sets a pod's status as the CNI harness would.
    pub fn set_pod_ip(&self, name: &str, ip: &str) -> Result<()> {
        let mut p = self.obj("pods", name)?;
        p["status"] = json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]});
        let pods = sluice_test_apiserver::resources::find("", "v1", "pods").context("pods")?;
        self.server
            .with_store(|s| s.update(pods, Some("demo"), name, p, Part::Status))
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        Ok(())
    }
}

pub fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}
