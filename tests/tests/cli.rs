//! `sluice status|wait|observe` (the binary without CNI_COMMAND) against a
//! fake agent: a thread serving the `sluice_proto` socket whose answers the
//! test changes while the CLI runs. No root or namespaces needed.
//!
//! Run: `cargo build --bins && cargo test -p sluice-tests --test cli`
//! (SLUICE_BIN_DIR overrides where the `sluice` binary is taken from).
#![expect(
    clippy::expect_used,
    reason = "the fake agent (outside #[test] fns, which clippy.toml covers): a panic is the failure report"
)]
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use sluice_proto::{ObserveFilter, Request, Response};
use sluice_tests::{TempDir, bin_dir};

// ---------------------------------------------------------------------------
// Fake agent

struct AgentState {
    /// The answer to `Status`.
    status: Response,
    synced: bool,
    objects: BTreeMap<String, String>,
    /// `Observe` streams `records` only for exactly this filter; any other
    /// filter is answered with an error line.
    expected_filter: ObserveFilter,
    records: Vec<Value>,
    requests: Vec<Request>,
    /// The answer to `Info`.
    info: Response,
    /// After the records, keep an `Observe` stream open until the agent
    /// stops (else it ends, as an agent going away does).
    hold_stream: bool,
}

struct FakeAgent {
    dir: TempDir,
    state: Arc<Mutex<AgentState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeAgent {
    fn start() -> Result<Self> {
        Self::start_in(TempDir::new("sluice-cli-agent-")?)
    }

    /// An agent serving `dir`/agent.sock (a restarted agent: the same path).
    fn start_in(dir: TempDir) -> Result<Self> {
        let _stale = std::fs::remove_file(dir.0.join("agent.sock"));
        let listener = UnixListener::bind(dir.0.join("agent.sock"))?;
        listener.set_nonblocking(true)?;
        let state = Arc::new(Mutex::new(AgentState {
            status: Response::Ok,
            synced: true,
            objects: BTreeMap::new(),
            expected_filter: ObserveFilter::default(),
            records: Vec::new(),
            requests: Vec::new(),
            info: Response::Info {
                mode: sluice_proto::AgentMode::Cluster,
                node: Some("node-1".into()),
                synced: true,
            },
            hold_stream: false,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (st, sp) = (st.clone(), sp.clone());
                        std::thread::spawn(move || serve(&conn, &st, &sp));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Ok(Self {
            dir,
            state,
            stop,
            thread: Some(thread),
        })
    }

    fn socket(&self) -> String {
        self.dir.0.join("agent.sock").display().to_string()
    }

    fn with<T>(&self, f: impl FnOnce(&mut AgentState) -> T) -> Result<T> {
        let mut s = self
            .state
            .lock()
            .map_err(|_| anyhow::anyhow!("fake agent state poisoned"))?;
        Ok(f(&mut s))
    }

    fn set_objects(&self, kv: &[(&str, &str)]) -> Result<()> {
        self.with(|s| {
            s.objects = kv
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        })
    }

    fn requests(&self) -> Result<Vec<Request>> {
        self.with(|s| s.requests.clone())
    }

    /// Stops serving (every connection it holds closes, as when the agent
    /// process dies) and hands back its directory for a restart.
    fn stop(mut self) -> TempDir {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _joined = t.join();
        }
        TempDir(std::mem::take(&mut self.dir.0))
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _joined = t.join();
        }
    }
}

fn serve(conn: &UnixStream, state: &Mutex<AgentState>, stop: &AtomicBool) {
    let _timeout = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    if BufReader::new(conn).read_line(&mut line).is_err() {
        return;
    }
    let Ok(req) = serde_json::from_str::<Request>(line.trim_end()) else {
        return;
    };
    let hold;
    let lines: Vec<String> = {
        let Ok(mut s) = state.lock() else { return };
        hold = s.hold_stream && matches!(req, Request::Observe { .. });
        s.requests.push(req.clone());
        match req {
            Request::Status => vec![s.status.to_line().expect("a response serializes")],
            Request::Info => vec![s.info.to_line().expect("a response serializes")],
            Request::Programmed => vec![
                Response::Programmed {
                    synced: s.synced,
                    objects: s.objects.clone(),
                }
                .to_line()
                .expect("a response serializes"),
            ],
            Request::ProgrammedOf { keys } => vec![
                Response::Programmed {
                    synced: s.synced,
                    objects: s
                        .objects
                        .iter()
                        .filter(|(k, _)| keys.contains(k))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                }
                .to_line()
                .expect("a response serializes"),
            ],
            Request::Observe { filter, .. } if filter == s.expected_filter => {
                s.records.iter().map(|r| format!("{r}\n")).collect()
            }
            Request::Observe { filter, .. } => vec![
                Response::error(7, "unexpected filter", format!("{filter:?}"))
                    .to_line()
                    .expect("a response serializes"),
            ],
            _ => vec![Response::Ok.to_line().expect("a response serializes")],
        }
    };
    let mut out = conn;
    for l in lines {
        if out.write_all(l.as_bytes()).is_err() {
            return;
        }
        // Streamed, not one write.
        std::thread::sleep(Duration::from_millis(20));
    }
    while hold && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------
// Running the CLI

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}, stdout {:?}, stderr {:?}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// `sluice ARGS` as a user runs it: no CNI_* variables.
fn sluice(args: &[&str]) -> Command {
    let mut cmd = Command::new(bin_dir().join("sluice"));
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // A user's Ctrl-C: SIGINT at its default action, even when this test
    // runs from a script that started it in the background (a shell
    // without job control ignores SIGINT there, and exec keeps that).
    // SAFETY: signal(2) is async-signal-safe, called between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    cmd
}

fn spawn(args: &[&str]) -> Result<Child> {
    let bin = bin_dir().join("sluice");
    ensure!(
        bin.exists(),
        "{} is missing: run `cargo build --bins` first (or set SLUICE_BIN_DIR)",
        bin.display()
    );
    Ok(sluice(args).spawn()?)
}

/// Waits for `child`, killing it after `limit` (a hung CLI fails the test
/// instead of hanging it).
fn finish(mut child: Child, limit: Duration) -> Result<Out> {
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _killed = child.kill();
            let _reaped = child.wait();
            bail!("sluice still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut stdout)?;
    }
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut stderr)?;
    }
    Ok(Out {
        code: status.code().unwrap_or(-1),
        stdout,
        stderr,
    })
}

fn run(args: &[&str]) -> Result<Out> {
    finish(spawn(args)?, Duration::from_secs(10))
}

fn nobody_listens(agent: &FakeAgent) -> String {
    agent.dir.0.join("nobody.sock").display().to_string()
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn without_a_known_command_the_binary_prints_usage_and_exits_2() -> Result<()> {
    for args in [
        &[][..],
        &["frob"],
        &["ADD"],
        &["wait"],
        &["wait", "Pod"],
        &["status", "--frob"],
        &["observe", "--direction", "sideways"],
    ] {
        let out = run(args)?;
        ensure!(
            out.code == 2 && out.stdout.is_empty() && out.stderr.contains("Usage: sluice"),
            "{args:?}: {out}"
        );
    }
    let out = run(&["--help"])?;
    ensure!(
        out.code == 0 && out.stdout.contains("Usage: sluice"),
        "{out}"
    );
    // With CNI_COMMAND set the binary is the plugin, arguments or not.
    let out = finish(
        sluice(&["status"]).env("CNI_COMMAND", "FROB").spawn()?,
        Duration::from_secs(10),
    )?;
    let v: Value = serde_json::from_str(&out.stdout).with_context(|| out.to_string())?;
    ensure!(out.code == 1 && v["code"] == 4, "{out}");
    Ok(())
}

#[test]
fn status_reports_readiness_sync_and_programmed_objects() -> Result<()> {
    let agent = FakeAgent::start()?;
    let sock = agent.socket();
    agent.set_objects(&[("NetworkPolicy/x/allow-a", "42"), ("Namespace/x", "5")])?;

    let out = run(&["status", "--socket", &sock])?;
    ensure!(out.code == 0, "{out}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    for want in [
        "ready: yes",
        "synced: yes",
        "NetworkPolicy x/allow-a 42",
        "Namespace x 5",
    ] {
        ensure!(lines.contains(&want), "no {want:?}: {out}");
    }
    ensure!(agent.requests()? == [Request::Status, Request::Programmed, Request::Info]);

    let out = run(&["status", "--socket", &sock, "-o", "json"])?;
    ensure!(out.code == 0, "{out}");
    let v: Value = serde_json::from_str(&out.stdout).with_context(|| out.to_string())?;
    ensure!(
        v["ready"] == true
            && v["status"] == json!({"result": "ok"})
            && v["programmed"]
                == json!({"result": "programmed", "synced": true,
                    "objects": {"NetworkPolicy/x/allow-a": "42", "Namespace/x": "5"}}),
        "{v}"
    );

    // Not ready, not synced: exit 1, and it says why.
    agent.with(|s| {
        s.status = Response::error(50, "not ready", "still listing");
        s.synced = false;
    })?;
    let out = run(&["status", "--socket", &sock])?;
    ensure!(out.code == 1, "{out}");
    ensure!(
        out.stdout.contains("ready: no") && out.stdout.contains("still listing"),
        "{out}"
    );
    ensure!(out.stdout.contains("synced: no"), "{out}");
    let out = run(&["status", "--socket", &sock, "-o", "json"])?;
    let v: Value = serde_json::from_str(&out.stdout).with_context(|| out.to_string())?;
    ensure!(
        out.code == 1 && v["ready"] == false && v["status"]["code"] == 50,
        "{out}"
    );

    // Nobody listening.
    // Nobody listening: 3, not the 1 of an agent that answers "not ready".
    let out = run(&["status", "--socket", &nobody_listens(&agent)])?;
    ensure!(
        out.code == 3 && out.stdout.contains("ready: no (cannot connect"),
        "{out}"
    );
    Ok(())
}

#[test]
fn status_says_standalone_needs_no_sync_and_an_unsynced_cluster_is_not_ready() -> Result<()> {
    let agent = FakeAgent::start()?;
    let sock = agent.socket();
    agent.with(|s| {
        s.synced = false;
        s.info = Response::Info {
            mode: sluice_proto::AgentMode::Standalone,
            node: None,
            synced: false,
        };
    })?;
    let out = run(&["status", "--socket", &sock])?;
    ensure!(out.code == 0, "{out}");
    for want in [
        "ready: yes",
        "mode: standalone (no API server: policy only through SetPolicy)",
        "synced: n/a (standalone: no API server, nothing to sync)",
    ] {
        ensure!(out.stdout.lines().any(|l| l == want), "no {want:?}: {out}");
    }
    ensure!(agent.requests()? == [Request::Status, Request::Programmed, Request::Info]);
    let out = run(&["status", "--socket", &sock, "-o", "json"])?;
    let v: Value = serde_json::from_str(&out.stdout).with_context(|| out.to_string())?;
    ensure!(
        out.code == 0 && v["ready"] == true && v["info"]["mode"] == "standalone",
        "{out}"
    );

    // Cluster mode, still listing: the agent answers, so 1, and it says why.
    agent.with(|s| {
        s.info = Response::Info {
            mode: sluice_proto::AgentMode::Cluster,
            node: Some("node-7".into()),
            synced: false,
        };
    })?;
    let out = run(&["status", "--socket", &sock])?;
    ensure!(out.code == 1, "{out}");
    for want in [
        "ready: no (not synced with the API server yet)",
        "mode: cluster (node node-7)",
        "synced: no (not every kind listed and programmed yet)",
    ] {
        ensure!(out.stdout.lines().any(|l| l == want), "no {want:?}: {out}");
    }
    Ok(())
}

#[test]
fn observe_reconnects_when_the_agent_restarts_and_prints_what_the_new_one_streams() -> Result<()> {
    let agent = FakeAgent::start()?;
    let sock = agent.socket();
    let (first, second) = (records()[0].clone(), records()[1].clone());
    agent.with(|s| {
        s.records = vec![first];
        s.hold_stream = true;
    })?;
    let mut child = spawn(&["observe", "--socket", &sock])?;
    // What it prints, as it prints it (the test waits for lines, not time).
    let printed = Arc::new(Mutex::new(Vec::<String>::new()));
    let stdout = child.stdout.take().context("observe's stdout")?;
    let reader = {
        let printed = printed.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if let Ok(mut p) = printed.lock() {
                    p.push(line);
                }
            }
        })
    };
    let lines = || printed.lock().map(|p| p.clone()).unwrap_or_default();
    let observed = |a: &FakeAgent| {
        a.requests()
            .is_ok_and(|r| r.iter().any(|q| matches!(q, Request::Observe { .. })))
    };
    ensure!(sluice_tests::eventually(Duration::from_secs(5), || {
        observed(&agent) && !lines().is_empty()
    }));

    // The agent dies: its stream ends and its socket refuses for a while.
    let dir = agent.stop();
    std::thread::sleep(Duration::from_millis(500));
    let restarted = FakeAgent::start_in(dir)?;
    restarted.with(|s| {
        s.records = vec![second];
        s.hold_stream = true;
    })?;
    ensure!(
        sluice_tests::eventually(Duration::from_secs(10), || {
            observed(&restarted) && lines().len() >= 2
        }),
        "printed {:?}",
        lines()
    );

    ensure!(
        child.try_wait()?.is_none(),
        "observe ended when the agent went away"
    );
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    ensure!(killed.success(), "kill -INT failed");
    let out = finish(child, Duration::from_secs(5))?;
    let _eof = reader.join();
    let lines = lines();
    ensure!(lines.len() == 2, "{lines:?} {out}");
    ensure!(
        lines[0].contains("TCP 34567->80") && lines[1].contains("UDP 5353->53"),
        "{lines:?} {out}"
    );
    for want in [
        "lost the agent (the agent closed the stream); reconnecting",
        "agent unreachable (cannot connect",
        "reconnected to the agent",
    ] {
        ensure!(out.stderr.contains(want), "stderr lacks {want:?}: {out}");
    }
    Ok(())
}

#[test]
fn wait_returns_once_the_agent_reports_the_version() -> Result<()> {
    let agent = FakeAgent::start()?;
    let sock = agent.socket();
    agent.set_objects(&[("NetworkPolicy/x/allow-a", "41")])?;
    let started = Instant::now();
    let child = spawn(&[
        "wait",
        "netpol/x/allow-a@42",
        "Namespace/x",
        "--timeout",
        "20s",
        "--socket",
        &sock,
    ])?;
    // Still waiting, and asking again: allow-a is at 41 and Namespace/x
    // is unknown.
    ensure!(
        sluice_tests::eventually(Duration::from_secs(10), || agent
            .requests()
            .is_ok_and(|r| r.len() >= 5)),
        "only {} polls",
        agent.requests()?.len()
    );
    let mut child = child;
    ensure!(child.try_wait()?.is_none(), "wait ended before its objects");
    agent.set_objects(&[("NetworkPolicy/x/allow-a", "42")])?;
    std::thread::sleep(Duration::from_millis(100));
    agent.set_objects(&[("NetworkPolicy/x/allow-a", "43"), ("Namespace/x", "7")])?;
    let out = finish(child, Duration::from_secs(5))?;
    ensure!(out.code == 0, "{out}");
    ensure!(
        out.stdout
            .contains("NetworkPolicy/x/allow-a: programmed at 43")
            && out.stdout.contains("Namespace/x: programmed at 7"),
        "{out}"
    );
    ensure!(started.elapsed() < Duration::from_secs(5));
    // Only the targets are asked for, spelled as the agent spells them.
    let asked = Request::ProgrammedOf {
        keys: vec!["NetworkPolicy/x/allow-a".into(), "Namespace/x".into()],
    };
    ensure!(agent.requests()?.iter().all(|r| *r == asked));

    // Already there: at once. Any version without @RV.
    let out = run(&["wait", "NetworkPolicy/x/allow-a", "--socket", &sock])?;
    ensure!(out.code == 0, "{out}");

    // --gone: until the agent no longer has it.
    let child = spawn(&["wait", "--gone", "Namespace/x", "--socket", &sock])?;
    std::thread::sleep(Duration::from_millis(100));
    agent.set_objects(&[("NetworkPolicy/x/allow-a", "43")])?;
    let out = finish(child, Duration::from_secs(5))?;
    ensure!(
        out.code == 0 && out.stdout.contains("Namespace/x: gone"),
        "{out}"
    );
    Ok(())
}

#[test]
fn wait_times_out_saying_what_is_missing() -> Result<()> {
    let agent = FakeAgent::start()?;
    let sock = agent.socket();
    agent.set_objects(&[("NetworkPolicy/x/allow-a", "42"), ("Namespace/x", "5")])?;

    let started = Instant::now();
    let out = run(&[
        "wait",
        "NetworkPolicy/x/allow-a@43",
        "Pod/x/web",
        "Namespace/x",
        "--timeout",
        "300ms",
        "--socket",
        &sock,
    ])?;
    let took = started.elapsed();
    ensure!(out.code == 1, "{out}");
    ensure!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "took {took:?}"
    );
    ensure!(out.stderr.contains("timed out after 300ms"), "{out}");
    ensure!(
        out.stderr
            .contains("NetworkPolicy/x/allow-a@43: programmed at 42"),
        "{out}"
    );
    ensure!(out.stderr.contains("Pod/x/web: not programmed"), "{out}");
    ensure!(
        !out.stderr.contains("Namespace/x"),
        "met, not missing: {out}"
    );

    // Gone means gone after the sync: an unsynced agent is not believed.
    agent.with(|s| s.synced = false)?;
    let out = run(&[
        "wait",
        "--gone",
        "Pod/x/web",
        "--timeout",
        "100ms",
        "--socket",
        &sock,
    ])?;
    ensure!(
        out.code == 1 && out.stderr.contains("has not synced"),
        "{out}"
    );

    // Nobody listening: polled until the timeout, then said so.
    let out = run(&[
        "wait",
        "Pod/x/web",
        "--timeout",
        "100ms",
        "--socket",
        &nobody_listens(&agent),
    ])?;
    ensure!(
        out.code == 1
            && out.stderr.contains("did not answer")
            && out.stderr.contains("Pod/x/web: unknown"),
        "{out}"
    );
    Ok(())
}

fn records() -> Vec<Value> {
    vec![
        json!({
            "ktime_ns": 1_000_000_000u64, "verdict": "DROPPED", "reason": "policy",
            "direction": "ingress", "ep_id": 1, "peer_identity": 7, "protocol": "TCP",
            "src": "10.244.1.5", "dst": "10.244.1.9", "src_port": 34567, "dst_port": 80,
            "length": 60, "src_namespace": "x", "src_pod": "client",
            "dst_namespace": "x", "dst_pod": "web"
        }),
        json!({
            "ktime_ns": 2_000_000_000u64, "verdict": "DROPPED", "reason": "no-policy-match",
            "direction": "ingress", "ep_id": 1, "peer_identity": 2, "protocol": "UDP",
            "src": "192.0.2.7", "dst": "10.244.1.9", "src_port": 5353, "dst_port": 53,
            "length": 80, "dst_namespace": "x", "dst_pod": "web"
        }),
    ]
}

#[test]
fn observe_sends_the_filter_and_prints_each_streamed_record() -> Result<()> {
    let agent = FakeAgent::start()?;
    let sock = agent.socket();
    let filter = ObserveFilter {
        namespace: Some("x".into()),
        pod: Some("x/web".into()),
        verdict: Some("dropped".into()),
        direction: Some("ingress".into()),
    };
    agent.with(|s| {
        s.expected_filter = filter.clone();
        s.records = records();
    })?;
    let args = [
        "observe",
        "--namespace",
        "x",
        "--pod",
        "x/web",
        "--verdict",
        "dropped",
        "--direction",
        "ingress",
        "--no-reconnect",
        "--socket",
        &sock,
    ];

    // Human lines: time, verdict, direction, ends, protocol, ports, reason.
    let out = run(&args)?;
    ensure!(out.code == 0, "{out}");
    ensure!(
        agent.requests()?
            == [Request::Observe {
                filter,
                replay: sluice_proto::Replay::default()
            }]
    );
    let lines: Vec<&str> = out.stdout.lines().collect();
    ensure!(lines.len() == 2, "{out}");
    let rest = |l: &str| l.split_once(' ').map(|(_, r)| r.to_string());
    ensure!(
        rest(lines[0]).as_deref()
            == Some(
                "DROPPED ingress 10.244.1.5(x/client) -> 10.244.1.9(x/web) TCP 34567->80 policy"
            ),
        "{out}"
    );
    ensure!(
        rest(lines[1]).as_deref()
            == Some("DROPPED ingress 192.0.2.7 -> 10.244.1.9(x/web) UDP 5353->53 no-policy-match"),
        "{out}"
    );
    let time = lines[0].split(' ').next().unwrap();
    ensure!(
        time.len() == 12 && time.as_bytes()[2] == b':' && time.as_bytes()[8] == b'.',
        "time {time:?}"
    );

    // -o json: the lines as received.
    let mut json_args = args.to_vec();
    json_args.extend(["-o", "json"]);
    let out = run(&json_args)?;
    ensure!(out.code == 0, "{out}");
    let got: Vec<Value> = out
        .stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| out.to_string())?;
    ensure!(got == records(), "{out}");

    // Another filter: the fake agent refuses it, the CLI says so.
    let out = run(&[
        "observe",
        "--direction",
        "egress",
        "--no-reconnect",
        "--socket",
        &sock,
    ])?;
    ensure!(
        out.code == 1 && out.stdout.is_empty() && out.stderr.contains("unexpected filter"),
        "{out}"
    );

    let out = run(&["observe", "--socket", &nobody_listens(&agent)])?;
    ensure!(
        out.code == 1 && out.stderr.contains("cannot connect"),
        "{out}"
    );
    Ok(())
}

#[test]
fn observe_runs_until_interrupted() -> Result<()> {
    // An agent that accepts and streams nothing: the CLI keeps listening
    // (no read timeout) until the user interrupts it.
    let dir = TempDir::new("sluice-cli-quiet-")?;
    let path: PathBuf = dir.0.join("agent.sock");
    let listener = UnixListener::bind(&path)?;
    let (asked, request) = std::sync::mpsc::channel();
    let held = std::thread::spawn(move || -> Result<()> {
        let (c, _) = listener.accept()?;
        let mut line = String::new();
        BufReader::new(&c).read_line(&mut line)?;
        let _told = asked.send(line);
        // Held open until the CLI goes away.
        let mut rest = Vec::new();
        let _eof = (&c).read_to_end(&mut rest);
        Ok(())
    });
    let mut child = spawn(&["observe", "--socket", &path.display().to_string()])?;
    let line = request
        .recv_timeout(Duration::from_secs(10))
        .context("observe never asked")?;
    std::thread::sleep(Duration::from_millis(200));
    ensure!(child.try_wait()?.is_none(), "observe ended on its own");
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    ensure!(killed.success(), "kill -INT failed");
    let out = finish(child, Duration::from_secs(5))?;
    ensure!(out.code != 0 && out.stdout.is_empty(), "{out}");
    held.join()
        .map_err(|_| anyhow::anyhow!("agent thread panicked"))??;
    ensure!(line.contains(r#""op":"observe""#), "{line}");
    Ok(())
}
