//! A CRI client that talks to a container runtime over its unix socket as
//! kubelet does: the v1 RuntimeService and ImageService from the `k8s-cri`
//! crate (tonic), behind blocking calls so that tests read top to bottom.
//! Every call has a deadline, so a hung runtime fails a test instead of
//! hanging it.
use std::{net::IpAddr, path::Path, time::Duration};

use anyhow::{Context as _, Result, bail};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    self as cri, image_service_client::ImageServiceClient,
    runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// How long one CRI call may take (RunPodSandbox runs the CNI ADD).
const CALL: Duration = Duration::from_secs(60);

/// A connection to one runtime's CRI socket.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

/// What kubelet says about a pod when it asks for its sandbox.
#[derive(Clone, Debug)]
pub struct SandboxSpec {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Directory for the containers' logs (kubelet: /var/log/pods/<ns>_<name>_<uid>).
    pub log_directory: String,
    /// cgroupfs parent of the pod's cgroups.
    pub cgroup_parent: String,
    pub labels: Vec<(String, String)>,
}

impl SandboxSpec {
    /// The sandbox config kubelet builds for a pod on the pod network
    /// (network and IPC namespaces of the pod, PID per container).
    pub fn config(&self) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: self.name.clone(),
                uid: self.uid.clone(),
                namespace: self.namespace.clone(),
                attempt: 0,
            }),
            hostname: self.name.clone(),
            log_directory: self.log_directory.clone(),
            labels: self.labels.iter().cloned().collect(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Pod.into(),
                        pid: cri::NamespaceMode::Container.into(),
                        ipc: cri::NamespaceMode::Pod.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// What ExecSync returned.
#[derive(Clone, Debug)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A sandbox as PodSandboxStatus reports it.
#[derive(Clone, Debug)]
pub struct SandboxStatus {
    pub ready: bool,
    pub ips: Vec<IpAddr>,
    /// The sandbox's network namespace path (from the verbose info).
    pub netns: Option<String>,
}

impl Cri {
    /// Connects to the CRI socket at `socket`.
    pub fn connect(socket: &Path) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let path = socket.to_path_buf();
        let channel = rt.block_on(async move {
            // The URI is unused: every connection is the unix socket.
            Endpoint::try_from("http://[::]:0")?
                .connect_timeout(Duration::from_secs(5))
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
        })?;
        Ok(Self {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    fn call<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T> {
        self.rt.block_on(async {
            match tokio::time::timeout(CALL, f).await {
                Ok(Ok(r)) => Ok(r.into_inner()),
                Ok(Err(s)) => bail!("{what}: {:?}: {}", s.code(), s.message()),
                Err(_) => bail!("{what}: no answer within {CALL:?}"),
            }
        })
    }

    /// The runtime's name and version.
    pub fn version(&self) -> Result<String> {
        let v = self.call(
            "Version",
            self.runtime.clone().version(cri::VersionRequest {
                version: "v1".into(),
            }),
        )?;
        Ok(format!("{} {}", v.runtime_name, v.runtime_version))
    }

    /// The runtime's conditions (`RuntimeReady`, `NetworkReady`): (type,
    /// status, reason, message).
    pub fn conditions(&self) -> Result<Vec<(String, bool, String, String)>> {
        let s = self.call(
            "Status",
            self.runtime
                .clone()
                .status(cri::StatusRequest { verbose: false }),
        )?;
        Ok(s.status
            .into_iter()
            .flat_map(|s| s.conditions)
            .map(|c| (c.r#type, c.status, c.reason, c.message))
            .collect())
    }

    /// Is the image `name` known to the runtime?
    pub fn has_image(&self, name: &str) -> Result<bool> {
        let s = self.call(
            "ImageStatus",
            self.images.clone().image_status(cri::ImageStatusRequest {
                image: Some(cri::ImageSpec {
                    image: name.into(),
                    ..Default::default()
                }),
                verbose: false,
            }),
        )?;
        Ok(s.image.is_some())
    }

    /// RunPodSandbox: the sandbox's id (the CNI ADD has run when it returns).
    pub fn run_pod_sandbox(&self, config: &cri::PodSandboxConfig) -> Result<String> {
        let r = self.call(
            "RunPodSandbox",
            self.runtime
                .clone()
                .run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(config.clone()),
                    runtime_handler: String::new(),
                }),
        )?;
        Ok(r.pod_sandbox_id)
    }

    pub fn stop_pod_sandbox(&self, id: &str) -> Result<()> {
        self.call(
            "StopPodSandbox",
            self.runtime
                .clone()
                .stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: id.into(),
                }),
        )
        .map(drop)
    }

    pub fn remove_pod_sandbox(&self, id: &str) -> Result<()> {
        self.call(
            "RemovePodSandbox",
            self.runtime
                .clone()
                .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: id.into(),
                }),
        )
        .map(drop)
    }

    /// The ids of every sandbox the runtime has.
    pub fn list_pod_sandboxes(&self) -> Result<Vec<String>> {
        let r = self.call(
            "ListPodSandbox",
            self.runtime
                .clone()
                .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None }),
        )?;
        Ok(r.items.into_iter().map(|s| s.id).collect())
    }

    pub fn pod_sandbox_status(&self, id: &str) -> Result<SandboxStatus> {
        let r = self.call(
            "PodSandboxStatus",
            self.runtime
                .clone()
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: id.into(),
                    verbose: true,
                }),
        )?;
        let status = r.status.context("PodSandboxStatus without status")?;
        let mut ips = Vec::new();
        if let Some(n) = &status.network {
            for ip in std::iter::once(n.ip.as_str())
                .chain(n.additional_ips.iter().map(|i| i.ip.as_str()))
                .filter(|s| !s.is_empty())
            {
                ips.push(ip.parse().with_context(|| format!("pod IP {ip:?}"))?);
            }
        }
        // containerd's verbose info: {"info": "{... \"runtimeSpec\": {\"linux\":
        // {\"namespaces\": [{\"type\": \"network\", \"path\": ...}]}}}"}.
        let netns = r
            .info
            .get("info")
            .and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok())
            .and_then(|v| {
                v["runtimeSpec"]["linux"]["namespaces"]
                    .as_array()?
                    .iter()
                    .find(|n| n["type"] == "network")?["path"]
                    .as_str()
                    .map(str::to_owned)
            });
        Ok(SandboxStatus {
            ready: status.state == i32::from(cri::PodSandboxState::SandboxReady),
            ips,
            netns,
        })
    }

    /// CreateContainer: `command` replaces the image's entrypoint.
    pub fn create_container(
        &self,
        sandbox_id: &str,
        sandbox: &cri::PodSandboxConfig,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> Result<String> {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            log_path: format!("{name}/0.log"),
            linux: Some(cri::LinuxContainerConfig::default()),
            ..Default::default()
        };
        let r = self.call(
            "CreateContainer",
            self.runtime
                .clone()
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: sandbox_id.into(),
                    config: Some(config),
                    sandbox_config: Some(sandbox.clone()),
                }),
        )?;
        Ok(r.container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<()> {
        self.call(
            "StartContainer",
            self.runtime
                .clone()
                .start_container(cri::StartContainerRequest {
                    container_id: id.into(),
                }),
        )
        .map(drop)
    }

    /// ExecSync: runs `cmd` in the container, `timeout` at most.
    pub fn exec_sync(&self, id: &str, cmd: &[&str], timeout: Duration) -> Result<ExecOutput> {
        let r = self.call(
            "ExecSync",
            self.runtime.clone().exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
                timeout: i64::try_from(timeout.as_secs().max(1))?,
            }),
        )?;
        Ok(ExecOutput {
            exit_code: r.exit_code,
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        })
    }
}
