//! Installing Sluice on a node and taking it away again: the CNI plugin
//! binary and the conflist, written so that a container runtime watching
//! the directories never sees a half-written file (a temporary file in the
//! same directory, fsync, rename, fsync of the directory), and uninstall.
//!
//! - `install_plugin`, `install_conflist`: what `sluice-agent install-cni`
//!   (the DaemonSet's init container) does; idempotent, identical content
//!   is left alone.
//! - `write_conflist_when_ready`: the agent writes the conflist only once
//!   it is ready, because containerd 1.6/1.7 report NetworkReady as soon as
//!   a conflist exists and never call STATUS: a node without a working
//!   agent must get no pods.
//! - `uninstall`: detaches and unpins the data path (through `datapath`),
//!   removes the conflists that name the plugin, the plugin, and the
//!   endpoint registry.
use std::{
    io::{self, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use sluice_proto::{Request, Response};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tracing::{info, warn};

use crate::{
    config::{InstallCniArgs, UninstallArgs},
    datapath,
    metrics::Ready,
};

/// The plugin's file name in the CNI bin directory: the conflist's `type`.
pub const PLUGIN_NAME: &str = "sluice";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a CNI network configuration (JSON object)", path.display())]
    NotAConflist {
        path: PathBuf,
        #[source]
        source: Option<serde_json::Error>,
    },
    #[error("{} has no file name", .0.display())]
    NoFileName(PathBuf),
    #[error("the agent's CNI socket {}: {details}", path.display())]
    SocketNotServing { path: PathBuf, details: String },
    #[error("removing the data path's pins")]
    Datapath(#[source] datapath::DatapathError),
}

pub type Result<T, E = InstallError> = std::result::Result<T, E>;

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> InstallError {
    let path = path.to_owned();
    move |source| InstallError::Io { op, path, source }
}

/// What a write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Written,
    /// The file already had this content and mode.
    Unchanged,
}

/// Writes `data` to `dir/name` with `mode`, atomically: a reader sees the
/// old file or the new one, whole. The temporary file starts with a dot and
/// has no `.conf`/`.conflist`/`.json` extension, so a runtime scanning the
/// directory skips it. Identical content and mode: nothing is written.
pub fn write_atomic(dir: &Path, name: &str, data: &[u8], mode: u32) -> Result<Outcome> {
    let dest = dir.join(name);
    if let Ok(meta) = std::fs::metadata(&dest)
        && meta.permissions().mode() & 0o7777 == mode
        && std::fs::read(&dest).is_ok_and(|old| old == data)
    {
        return Ok(Outcome::Unchanged);
    }
    std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    // Removed on drop if anything below fails.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io_err("creating a temporary file in", dir))?;
    let tmp_path = tmp.path().to_owned();
    tmp.write_all(data).map_err(io_err("writing", &tmp_path))?;
    // Explicitly: the mode given at creation is cut by the umask.
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io_err("setting the mode of", &tmp_path))?;
    tmp.as_file()
        .sync_all()
        .map_err(io_err("syncing", &tmp_path))?;
    tmp.persist(&dest)
        .map_err(|e| io_err("renaming into place", &dest)(e.error))?;
    // The rename itself survives a crash once the directory is synced.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing", dir))?;
    Ok(Outcome::Written)
}

/// `sluice` next to the running executable: where the image has both.
pub fn default_plugin() -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(io_err("finding", Path::new("/proc/self/exe")))?;
    Ok(exe.with_file_name(PLUGIN_NAME))
}

/// Copies the plugin binary to `bin_dir/sluice`, mode 0755. A runtime may
/// be executing the old one: the rename leaves its inode alone.
pub fn install_plugin(plugin: &Path, bin_dir: &Path) -> Result<Outcome> {
    let data = std::fs::read(plugin).map_err(io_err("reading", plugin))?;
    write_atomic(bin_dir, PLUGIN_NAME, &data, 0o755)
}

/// Checks that `data` is a JSON object (a conflist or a single conf), so
/// that a broken file never lands where the runtime reads it.
fn check_conflist(path: &Path, data: &[u8]) -> Result<()> {
    match serde_json::from_slice::<serde_json::Value>(data) {
        Ok(v) if v.is_object() => Ok(()),
        Ok(_) => Err(InstallError::NotAConflist {
            path: path.to_owned(),
            source: None,
        }),
        Err(e) => Err(InstallError::NotAConflist {
            path: path.to_owned(),
            source: Some(e),
        }),
    }
}

/// Writes the conflist `src` into `conf_dir` under its own file name, mode
/// 0644. Returns where it went.
pub fn install_conflist(src: &Path, conf_dir: &Path) -> Result<(PathBuf, Outcome)> {
    let name = src
        .file_name()
        .ok_or_else(|| InstallError::NoFileName(src.to_owned()))?
        .to_string_lossy()
        .into_owned();
    let data = std::fs::read(src).map_err(io_err("reading", src))?;
    check_conflist(src, &data)?;
    let outcome = write_atomic(conf_dir, &name, &data, 0o644)?;
    Ok((conf_dir.join(name), outcome))
}

/// Does this CNI configuration (a conflist or a single conf) use the
/// plugin?
fn names_plugin(conf: &serde_json::Value) -> bool {
    conf["type"] == PLUGIN_NAME
        || conf["plugins"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["type"] == PLUGIN_NAME))
}

/// What `uninstall` removed.
#[derive(Debug, Default)]
pub struct Uninstalled {
    pub datapath: datapath::Removed,
    /// Conflists, the plugin, the registry: each path removed.
    pub files: Vec<PathBuf>,
}

/// What to take away; every part is optional but the pins.
#[derive(Clone, Debug)]
pub struct Uninstall<'a> {
    pub bpffs: &'a Path,
    pub cni_conf_dir: Option<&'a Path>,
    pub cni_bin_dir: Option<&'a Path>,
    pub state_dir: Option<&'a Path>,
}

/// Takes Sluice off the node (the agent stopped first): detaches its links
/// and filters and removes its pins; in `cni_conf_dir`, every `.conf`,
/// `.conflist` or `.json` file whose configuration uses the plugin (what
/// install-cni or the agent wrote, whatever its name), and install-cni's
/// leftover temporary files; `cni_bin_dir/sluice`; `state_dir`. Pod
/// interfaces, addresses and routes, and the node's own, are left alone.
/// Running it twice is fine.
pub fn uninstall(what: &Uninstall<'_>) -> Result<Uninstalled> {
    let mut out = Uninstalled {
        datapath: datapath::remove_pins(what.bpffs).map_err(InstallError::Datapath)?,
        files: Vec::new(),
    };
    if let Some(dir) = what.cni_conf_dir {
        out.files.extend(remove_conflists(dir)?);
    }
    if let Some(dir) = what.cni_bin_dir {
        let plugin = dir.join(PLUGIN_NAME);
        if remove_file(&plugin)? {
            out.files.push(plugin);
        }
    }
    if let Some(dir) = what.state_dir {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => out.files.push(dir.to_owned()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing", dir)(e)),
        }
    }
    Ok(out)
}

/// `true` if it was there.
fn remove_file(path: &Path) -> Result<bool> {
    sluice_common::not_found_ok(std::fs::remove_file(path))
        .map(|r| r.is_some())
        .map_err(io_err("removing", path))
}

fn remove_conflists(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(io_err("listing", dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(io_err("listing", dir))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ours = if name.starts_with('.') && name.ends_with(".tmp") {
            // A temporary file of write_atomic's, left by a crash.
            name.contains(".conflist.") || name.contains(".conf.")
        } else if [".conf", ".conflist", ".json"]
            .iter()
            .any(|x| name.ends_with(x))
        {
            // Another plugin's file that is not JSON is not ours either.
            std::fs::read(&path)
                .ok()
                .and_then(|d| serde_json::from_slice::<serde_json::Value>(&d).ok())
                .is_some_and(|v| names_plugin(&v))
        } else {
            false
        };
        if ours && remove_file(&path)? {
            removed.push(path);
        }
    }
    Ok(removed)
}

/// Asks the agent's own socket for STATUS: the proof that it serves.
async fn socket_answers(socket: &Path) -> Result<()> {
    let fail = |details: String| InstallError::SocketNotServing {
        path: socket.to_owned(),
        details,
    };
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let (rd, mut wr) = stream.into_split();
    let line = Request::Status
        .to_line()
        .map_err(|e| fail(format!("encoding STATUS: {e}")))?;
    wr.write_all(line.as_bytes())
        .await
        .map_err(|e| fail(e.to_string()))?;
    let mut answer = String::new();
    tokio::io::BufReader::new(rd)
        .read_line(&mut answer)
        .await
        .map_err(|e| fail(e.to_string()))?;
    match serde_json::from_str::<Response>(answer.trim_end()) {
        Ok(Response::Ok) => Ok(()),
        Ok(other) => Err(fail(format!("STATUS answered {other:?}"))),
        Err(e) => Err(fail(format!("STATUS answer {answer:?}: {e}"))),
    }
}

/// Run mode's `--cni-conf-dir`/`--cni-conflist`: waits until the agent is
/// ready and its socket answers STATUS, then writes the conflist into
/// `conf_dir`. Every `recheck` it writes it again if it vanished or changed
/// (someone removed it, or the ConfigMap behind `src` was updated). It never
/// removes the conflist, not when the agent becomes unready nor when it
/// stops: the runtime would mark the node NotReady for what may be a short
/// API outage, while DEL works without the agent and ADD fails cleanly and
/// is retried. Ends only on an error that a retry cannot fix (`src` is not
/// a conflist).
pub async fn write_conflist_when_ready(
    ready: Ready,
    socket: PathBuf,
    src: PathBuf,
    conf_dir: PathBuf,
    recheck: Duration,
) -> Result<()> {
    ready.wait().await;
    let mut tick = tokio::time::interval(recheck);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut written = false;
    loop {
        tick.tick().await;
        if !written && let Err(e) = socket_answers(&socket).await {
            warn!(error = %e, "ready, but the CNI socket does not answer: no conflist yet");
            continue;
        }
        let (s, d) = (src.clone(), conf_dir.clone());
        let done = tokio::task::spawn_blocking(move || install_conflist(&s, &d)).await;
        match done {
            Ok(Ok((path, Outcome::Written))) => {
                info!(conflist = %path.display(), again = written, "agent ready: CNI conflist written");
                written = true;
            }
            Ok(Ok((_, Outcome::Unchanged))) => written = true,
            Ok(Err(e @ InstallError::NotAConflist { .. })) => return Err(e),
            Ok(Err(e)) => warn!(error = %e, "writing the CNI conflist failed; retried"),
            Err(e) => warn!(error = %e, "the conflist task failed; retried"),
        }
    }
}

/// `sluice-agent install-cni`.
pub fn install_cni(args: &InstallCniArgs) -> Result<()> {
    let plugin = match &args.plugin {
        Some(p) => p.clone(),
        None => default_plugin()?,
    };
    let outcome = install_plugin(&plugin, &args.cni_bin_dir)?;
    info!(plugin = %plugin.display(), bin_dir = %args.cni_bin_dir.display(), ?outcome, "CNI plugin installed");
    if let (Some(dir), Some(conflist)) = (&args.cni_conf_dir, &args.conflist) {
        let (path, outcome) = install_conflist(conflist, dir)?;
        info!(conflist = %path.display(), ?outcome, "CNI conflist installed");
    }
    Ok(())
}

/// `sluice-agent uninstall`.
pub fn uninstall_cmd(args: &UninstallArgs) -> Result<()> {
    let done = uninstall(&Uninstall {
        bpffs: &args.bpffs,
        cni_conf_dir: args.cni_conf_dir.as_deref(),
        cni_bin_dir: args.cni_bin_dir.as_deref(),
        state_dir: args.state_dir.as_deref(),
    })?;
    info!(
        bpffs = %args.bpffs.display(),
        links = done.datapath.links.links,
        clsact_filters = done.datapath.links.filters,
        maps = done.datapath.maps,
        files = ?done.files,
        "Sluice removed from the node"
    );
    Ok(())
}

#[cfg(test)]
mod tests;
