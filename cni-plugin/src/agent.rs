//! Client of the node agent: one JSON line out, one JSON line back, one
//! connection per request (see `sluice_proto`).
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice_proto::{Request, Response};

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
        // connect(2) on a unix socket does not wait for accept(); it fails
        // at once when nobody listens (ENOENT/ECONNREFUSED).
        let stream = UnixStream::connect(&self.socket).map_err(|source| AgentError::Connect {
            path: self.socket.clone(),
            source,
        })?;
        let line = req
            .to_line()
            .map_err(|e| AgentError::Io(io::Error::other(e)))?;
        let remaining = || {
            deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
                .ok_or(AgentError::Timeout(self.timeout))
        };
        stream
            .set_write_timeout(Some(remaining()?))
            .map_err(AgentError::Io)?;
        (&stream)
            .write_all(line.as_bytes())
            .map_err(|e| self.io_or_timeout(e))?;
        stream
            .set_read_timeout(Some(remaining()?))
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

    fn io_or_timeout(&self, e: io::Error) -> AgentError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                AgentError::Timeout(self.timeout)
            }
            _ => AgentError::Io(e),
        }
    }

    /// `call` for requests answered by `Ok` (or `Endpoint`): an unreachable
    /// agent is error 11, an agent error keeps the agent's code.
    pub fn expect_ok(&self, req: &Request) -> Result<()> {
        match self.call(req).map_err(Error::AgentUnavailable)? {
            Response::Ok | Response::Endpoint { .. } => Ok(()),
            Response::Error { code, msg, details } => Err(Error::Agent { code, msg, details }),
        }
    }
}
