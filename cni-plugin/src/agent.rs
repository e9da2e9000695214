//! Client of the node agent: one JSON line out, one JSON line back, one
//! connection per request (see `sluice_proto`).
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
use sluice_proto::{AddPhases, Request, Response};

use crate::{Error, Result};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("talking to the agent")]
    Io(#[source] io::Error),
    #[error("the agent closed the connection without answering")]
    Eof,
    #[error("the agent's answer is not a Response")]
    Decode(#[source] serde_json::Error),
}

#[derive(Clone, Debug)]
pub struct Agent {
    socket: PathBuf,
    timeout: Duration,
}

impl Agent {
    pub fn new(socket: &Path, timeout: Duration) -> Self {
        Self {
            socket: socket.to_path_buf(),
            timeout,
        }
    }

    /// Sends `req` and waits for the answer, all within the timeout.
    pub fn call(&self, req: &Request) -> Result<Response, AgentError> {
        let deadline = Instant::now() + self.timeout;
        let stream = self.send(req, deadline)?;
        stream
            .set_read_timeout(Some(self.remaining(deadline)?))
            .map_err(AgentError::Io)?;
        let mut answer = String::new();
        let n = BufReader::new(&stream)
            .read_line(&mut answer)
            .map_err(|e| self.io_or_timeout(e))?;
        if n == 0 {
            return Err(AgentError::Eof);
        }
        serde_json::from_str(answer.trim_end()).map_err(AgentError::Decode)
    }

    /// Sends `req` (`Observe`) within the timeout and hands back the
    /// connection to read the agent's lines from, without a read timeout:
    /// a stream may stay quiet for as long as nothing happens.
    pub fn stream(&self, req: &Request) -> Result<BufReader<UnixStream>, AgentError> {
        let stream = self.send(req, Instant::now() + self.timeout)?;
        stream.set_read_timeout(None).map_err(AgentError::Io)?;
        Ok(BufReader::new(stream))
    }

    /// Connects and writes the request line, both before `deadline`.
    fn send(&self, req: &Request, deadline: Instant) -> Result<UnixStream, AgentError> {
        let stream = self.connect(deadline)?;
        let line = req
            .to_line()
            .map_err(|e| AgentError::Io(io::Error::other(e)))?;
        stream
            .set_write_timeout(Some(self.remaining(deadline)?))
            .map_err(AgentError::Io)?;
        (&stream)
            .write_all(line.as_bytes())
            .map_err(|e| self.io_or_timeout(e))?;
        Ok(stream)
    }

    fn remaining(&self, deadline: Instant) -> Result<Duration, AgentError> {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(AgentError::Timeout(self.timeout))
    }

    /// connect(2) on a unix socket fails at once when nobody listens
    /// (ENOENT, ECONNREFUSED) but blocks while the listener's backlog is
    /// full, e.g. when the agent hangs. Non-blocking, it says EAGAIN
    /// instead; retry until the deadline.
    fn connect(&self, deadline: Instant) -> Result<UnixStream, AgentError> {
        let failed = |source: io::Error| AgentError::Connect {
            path: self.socket.clone(),
            source,
        };
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| failed(e.into()))?;
        let addr = UnixAddr::new(self.socket.as_path()).map_err(|e| failed(e.into()))?;
        loop {
            match connect(fd.as_raw_fd(), &addr) {
                Ok(()) => break,
                Err(Errno::EAGAIN) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(Errno::EAGAIN) => return Err(AgentError::Timeout(self.timeout)),
                Err(e) => return Err(failed(e.into())),
            }
        }
        let stream = UnixStream::from(fd);
        stream.set_nonblocking(false).map_err(AgentError::Io)?;
        Ok(stream)
    }

    fn io_or_timeout(&self, e: io::Error) -> AgentError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                AgentError::Timeout(self.timeout)
            }
            _ => AgentError::Io(e),
        }
    }

    /// `call` for requests answered by `Ok` (or `Endpoint`): an unreachable
    /// agent is error 11, an agent error keeps the agent's code. Any other
    /// answer is success (written so that new `Response` variants do not
    /// break the plugin).
    pub fn expect_ok(&self, req: &Request) -> Result<()> {
        match self.call(req).map_err(Error::AgentUnavailable)? {
            Response::Error { code, msg, details } => Err(Error::Agent { code, msg, details }),
            _ => Ok(()),
        }
    }

    /// `expect_ok` for AddEndpoint: where the agent's time went, when it
    /// says (older agents do not).
    pub fn add_endpoint(&self, req: &Request) -> Result<Option<AddPhases>> {
        match self.call(req).map_err(Error::AgentUnavailable)? {
            Response::Error { code, msg, details } => Err(Error::Agent { code, msg, details }),
            Response::Endpoint { phases, .. } => Ok(phases),
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use nix::sys::socket::{Backlog, bind, listen};

    use super::*;

    fn sock_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "sluice-agent-test-{}-{tag}.sock",
            std::process::id()
        ))
    }

    #[test]
    fn nobody_listening_is_a_connect_error() {
        let a = Agent::new(&sock_path("none"), Duration::from_millis(100));
        assert!(matches!(
            a.call(&Request::Status),
            Err(AgentError::Connect { .. })
        ));
        assert_eq!(
            a.expect_ok(&Request::Status).err().map(|e| e.code()),
            Some(11)
        );
    }

    #[test]
    fn a_hung_agent_with_a_full_backlog_times_out() {
        let path = sock_path("hung");
        let _gone = std::fs::remove_file(&path);
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        let addr = UnixAddr::new(path.as_path()).unwrap();
        bind(fd.as_raw_fd(), &addr).unwrap();
        listen(&fd, Backlog::new(0).unwrap()).unwrap();
        // Fill the backlog; nobody ever accepts.
        let mut held = Vec::new();
        while let Ok(s) = Agent::new(&path, Duration::from_millis(50))
            .connect(Instant::now() + Duration::from_millis(50))
        {
            held.push(s);
            assert!(held.len() < 64, "the backlog never filled");
        }
        let a = Agent::new(&path, Duration::from_millis(200));
        let start = Instant::now();
        assert!(matches!(
            a.call(&Request::Status),
            Err(AgentError::Timeout(_))
        ));
        assert!(start.elapsed() < Duration::from_secs(2));
        let _gone = std::fs::remove_file(&path);
    }

    #[test]
    fn an_agent_that_accepts_and_never_answers_times_out() {
        let path = sock_path("silent");
        let _gone = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let hold = std::thread::spawn(move || {
            listener.accept().map(|(c, _)| {
                std::thread::sleep(Duration::from_millis(500));
                drop(c);
            })
        });
        let a = Agent::new(&path, Duration::from_millis(100));
        assert!(matches!(
            a.call(&Request::Status),
            Err(AgentError::Timeout(_))
        ));
        let _joined = hold.join();
        let _gone = std::fs::remove_file(&path);
    }

    #[test]
    fn a_stream_reads_every_line_until_the_agent_closes() {
        let path = sock_path("stream");
        let _gone = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let agent = std::thread::spawn(move || -> io::Result<String> {
            let (c, _) = listener.accept()?;
            let mut req = String::new();
            BufReader::new(&c).read_line(&mut req)?;
            // Quiet for longer than the timeout: a stream has no read timeout.
            std::thread::sleep(Duration::from_millis(300));
            (&c).write_all(b"{\"n\":1}\n{\"n\":2}\n")?;
            Ok(req)
        });
        let a = Agent::new(&path, Duration::from_millis(100));
        let lines: Vec<String> = a
            .stream(&Request::Observe {
                replay: sluice_proto::Replay::default(),
                filter: sluice_proto::ObserveFilter::default(),
            })
            .unwrap()
            .lines()
            .map_while(io::Result::ok)
            .collect();
        assert_eq!(lines, [r#"{"n":1}"#, r#"{"n":2}"#]);
        let req = agent.join().expect("the agent thread panicked").unwrap();
        assert!(req.contains(r#""op":"observe""#), "{req}");
        let _gone = std::fs::remove_file(&path);
    }
}
