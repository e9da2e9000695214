//! `sluice status|wait|observe|explain|lint|assert`: the same binary as a small
//! command-line client of the node agent, when CNI_COMMAND is not set
//! (`explain -f` and `lint` read manifest files instead: see their modules).
//!
//! Parsing (`args`) and rendering (`show`) are pure; this module only talks
//! to the agent and prints. Exit status: 0 success (`status`: ready), 1 not
//! ready / timed out / the agent failed, 2 usage, 3 (`status`) the agent
//! did not answer at all. `lint` has its own (0 clean, 1 warnings, 3
//! errors).
pub mod args;
pub mod assert;
pub mod explain;
pub mod lint;
pub mod show;

use std::ffi::OsString;
use std::io::{self, BufRead, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::time::{ClockId, clock_gettime};
use serde_json::Value;
use sluice_proto::{ObserveFilter, Replay, Request, Response};

use crate::agent::{Agent, AgentError};
use args::{Command, Format, StatusArgs, Target, WaitArgs};
use show::{Answer, Clock};

/// Per request of `status` and for `observe` to connect.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often `wait` asks.
const POLL_EVERY: Duration = Duration::from_millis(10);

const OK: u8 = 0;
const FAILED: u8 = 1;

/// Runs the command line `args` (without the program name).
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = match args::parse(args) {
        Ok(cli) => cli,
        Err(e) => return usage(&e),
    };
    ExitCode::from(match cli.command {
        Command::Status(StatusArgs { socket, format }) => status(&socket.path, format),
        Command::Wait(WaitArgs {
            socket,
            targets,
            gone,
            timeout,
        }) => wait(&socket.path, &targets, gone, timeout),
        Command::Observe(a) => observe(
            &a.socket.path,
            a.filter(),
            a.replay(),
            a.format,
            !a.no_reconnect,
        ),
        Command::Explain(a) => match explain::run(&a) {
            Ok(text) => {
                let _printed = print(&text).is_ok();
                OK
            }
            Err(e) => {
                eprintln!("sluice explain: {e}");
                FAILED
            }
        },
        Command::Lint(a) => lint::run(&a),
        Command::Assert(a) => assert::run(&a),
        Command::Completions(a) => {
            // A closed stdout is nothing to report.
            let _written = io::stdout().write_all(&args::completions(a.shell)).is_ok();
            OK
        }
    })
}

/// `--help` on stdout (exit 0), or what is wrong with the command line and
/// the usage on stderr (exit 2).
fn usage(e: &clap::Error) -> ExitCode {
    // Nothing more to say if stdout or stderr is closed.
    let _printed = e.print().is_ok();
    ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(FAILED))
}

/// An agent error with its sources, on one line.
fn explain(e: &AgentError) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn ask(agent: &Agent, req: &Request) -> Answer {
    agent.call(req).map_err(|e| explain(&e))
}

/// Writes `text` to stdout; a closed pipe (`| head`) is not an error.
fn print(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

fn status(socket: &Path, format: Format) -> u8 {
    let agent = Agent::new(socket, REQUEST_TIMEOUT);
    let st = ask(&agent, &Request::Status);
    let programmed = ask(&agent, &Request::Programmed);
    let info = ask(&agent, &Request::Info);
    let text = match format {
        Format::Text => show::status_text(&st, &programmed, &info),
        Format::Json => format!("{}\n", show::status_json(&st, &programmed, &info)),
    };
    // A closed stdout changes nothing about readiness.
    let _printed = print(&text).is_ok();
    show::verdict(&st, &info).exit_code()
}

fn wait(socket: &Path, targets: &[Target], gone: bool, timeout: Duration) -> u8 {
    let deadline = Instant::now() + timeout;
    // Only the targets: on a large cluster the whole list is 100,000s of
    // entries. Known kinds are spelled as the agent spells them (parse_target).
    let ask = Request::ProgrammedOf {
        keys: targets.iter().map(|t| t.key.clone()).collect(),
    };
    loop {
        // A hung agent must not hold us much past the deadline, but even
        // `--timeout 0` deserves one real question.
        let left = deadline.saturating_duration_since(Instant::now());
        let agent = Agent::new(socket, left.max(Duration::from_millis(200)));
        let unmet = match agent.call(&ask) {
            Ok(Response::Programmed { synced, objects }) => {
                let unmet = show::unmet(targets, gone, synced, &objects);
                if unmet.is_empty() {
                    let mut text = show::met(targets, gone, &objects).join("\n");
                    text.push('\n');
                    let _printed = print(&text).is_ok();
                    return OK;
                }
                unmet
            }
            // The agent is there and says no: asking again will not help.
            Ok(Response::Error { code, msg, details }) => {
                eprintln!("sluice: the agent refused Programmed: {code}: {msg}: {details}");
                return FAILED;
            }
            Ok(other) => {
                eprintln!("sluice: unexpected answer to Programmed: {other:?}");
                return FAILED;
            }
            // Not (yet) reachable, e.g. restarting: keep asking.
            Err(e) => show::unanswered(targets, &explain(&e)),
        };
        let now = Instant::now();
        if now >= deadline {
            eprintln!(
                "sluice: timed out after {} waiting for:",
                show_duration(timeout)
            );
            for u in unmet {
                eprintln!("  {u}");
            }
            return FAILED;
        }
        std::thread::sleep(POLL_EVERY.min(deadline - now));
    }
}

fn show_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn clock_now() -> Clock {
    let mono_ns = clock_gettime(ClockId::CLOCK_MONOTONIC)
        .ok()
        .and_then(|t| {
            let s = u64::try_from(t.tv_sec()).ok()?;
            let ns = u64::try_from(t.tv_nsec()).ok()?;
            s.checked_mul(1_000_000_000)?.checked_add(ns)
        })
        .unwrap_or(0);
    let unix_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Clock { mono_ns, unix_ns }
}

/// How one observe stream ended.
enum Ended {
    /// Stop with this exit status.
    Exit(u8),
    /// The agent went away (restart, crash): reconnect.
    Lost(String),
}

/// First delay before reconnecting, doubled up to `RECONNECT_MAX`.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Streams drops until interrupted. When the agent goes away (it closed
/// the stream, or the connection broke) it reconnects, with backoff and
/// saying so on stderr; drops while it was away are not shown.
/// `--no-reconnect` ends with 0 then instead. The first connection failing
/// is exit 1: most likely the wrong socket.
fn observe(
    socket: &Path,
    filter: ObserveFilter,
    replay: Replay,
    format: Format,
    reconnect: bool,
) -> u8 {
    let agent = Agent::new(socket, REQUEST_TIMEOUT);
    // A reconnection does not replay again: what was shown stays shown.
    let again = Request::Observe {
        filter: filter.clone(),
        replay: Replay::default(),
    };
    let req = Request::Observe { filter, replay };
    let mut reader = match agent.stream(&req) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluice: {}", explain(&e));
            return FAILED;
        }
    };
    loop {
        let why = match follow(reader, format) {
            Ended::Exit(code) => return code,
            Ended::Lost(_) if !reconnect => return OK,
            Ended::Lost(why) => why,
        };
        eprintln!("sluice: lost the agent ({why}); reconnecting");
        let mut delay = RECONNECT_FIRST;
        reader = loop {
            std::thread::sleep(delay);
            match agent.stream(&again) {
                Ok(r) => {
                    eprintln!(
                        "sluice: reconnected to the agent (drops while it was away are not shown)"
                    );
                    break r;
                }
                Err(e) => {
                    delay = (delay * 2).min(RECONNECT_MAX);
                    eprintln!(
                        "sluice: agent unreachable ({}); retrying in {}",
                        explain(&e),
                        show_duration(delay)
                    );
                }
            }
        };
    }
}

fn follow(reader: std::io::BufReader<std::os::unix::net::UnixStream>, format: Format) -> Ended {
    for line in reader.lines() {
        let line = match line {
            Ok(l) => l,
            Err(e) => return Ended::Lost(format!("reading from the agent: {e}")),
        };
        if line.trim().is_empty() {
            continue;
        }
        let value: Option<Value> = serde_json::from_str(&line).ok();
        if let Some(e) = value.as_ref().and_then(show::stream_error) {
            eprintln!("sluice: {e}");
            return Ended::Exit(FAILED);
        }
        let text = match format {
            Format::Json => Some(line.clone()),
            Format::Text => value
                .as_ref()
                .and_then(|v| show::observe_line(v, clock_now())),
        };
        match text {
            Some(mut t) => {
                t.push('\n');
                if print(&t).is_err() {
                    // Nobody reads any more (`| head`): done.
                    return Ended::Exit(OK);
                }
            }
            None => eprintln!("sluice: not a record: {line}"),
        }
    }
    Ended::Lost("the agent closed the stream".into())
}
