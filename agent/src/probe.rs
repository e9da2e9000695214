//! Connectivity probes from inside a local pod's network namespace, for
//! `sluice assert`: nothing is injected into the pod; a thread of the agent
//! joins the pod's netns (the path the CNI gave at ADD) for one connection
//! and then ends, so no other work ever runs in that namespace.
//!
//! - TCP: open when the connection is established within the timeout;
//!   closed when it is refused (RST), unreachable or times out (a policy
//!   drop is a timeout).
//! - UDP: one datagram is sent and a reply awaited: open when any reply
//!   comes back within the timeout, closed otherwise (silence or an ICMP
//!   unreachable). UDP has no handshake, so a port that is allowed but has
//!   no responder behind it also reads as closed: a UDP probe needs a
//!   server that answers (an echo server, a DNS server).
use std::{
    io::ErrorKind,
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsFd,
    path::PathBuf,
    time::Duration,
};

use tracing::debug;

/// What a probe may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// `TCP` or `UDP`, any case.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            _ => None,
        }
    }
}

/// What one probe saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub open: bool,
    /// In words: `connected`, `refused`, `timed out`, `reply`, or the error.
    pub detail: String,
}

impl Outcome {
    fn open(detail: &str) -> Self {
        Self {
            open: true,
            detail: detail.into(),
        }
    }

    fn closed(detail: impl Into<String>) -> Self {
        Self {
            open: false,
            detail: detail.into(),
        }
    }
}

/// Why a probe could not run at all (not the same as closed).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("opening the pod's network namespace {path}")]
    Netns {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("entering the pod's network namespace {path}")]
    Setns {
        path: String,
        #[source]
        source: nix::Error,
    },
    #[error("the probe thread failed: {0}")]
    Thread(String),
}

/// The datagram a UDP probe sends.
const UDP_PAYLOAD: &[u8] = b"sluice-assert";

/// Probes `to` from the network namespace at `netns` on a fresh thread
/// (which ends with the probe) and awaits its result without blocking the
/// async workers.
pub async fn run(
    netns: PathBuf,
    to: SocketAddr,
    protocol: Protocol,
    timeout: Duration,
) -> Result<Outcome, ProbeError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("sluice-probe".into())
        .spawn(move || {
            let _receiver_gone = tx.send(in_netns(&netns, to, protocol, timeout));
        });
    if let Err(e) = spawned {
        return Err(ProbeError::Thread(e.to_string()));
    }
    rx.await
        .map_err(|_| ProbeError::Thread("ended without an answer".into()))?
}

/// Joins the namespace at `netns` (this thread only) and probes.
fn in_netns(
    netns: &std::path::Path,
    to: SocketAddr,
    protocol: Protocol,
    timeout: Duration,
) -> Result<Outcome, ProbeError> {
    let path = netns.display().to_string();
    let file = std::fs::File::open(netns).map_err(|source| ProbeError::Netns {
        path: path.clone(),
        source,
    })?;
    nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|source| ProbeError::Setns { path, source })?;
    let outcome = match protocol {
        Protocol::Tcp => tcp(to, timeout),
        Protocol::Udp => udp(to, timeout),
    };
    debug!(%to, ?protocol, open = outcome.open, detail = %outcome.detail, "probe");
    Ok(outcome)
}

fn tcp(to: SocketAddr, timeout: Duration) -> Outcome {
    match TcpStream::connect_timeout(&to, timeout) {
        Ok(_) => Outcome::open("connected"),
        Err(e) => Outcome::closed(io_words(&e)),
    }
}

fn udp(to: SocketAddr, timeout: Duration) -> Outcome {
    let any = match to.ip() {
        IpAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        IpAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    let sock = match UdpSocket::bind(any) {
        Ok(s) => s,
        Err(e) => return Outcome::closed(format!("binding: {e}")),
    };
    // Connected: an ICMP unreachable comes back as ECONNREFUSED, and only
    // the target's replies are read.
    if let Err(e) = sock.connect(to) {
        return Outcome::closed(io_words(&e));
    }
    if let Err(e) = sock.set_read_timeout(Some(timeout.max(Duration::from_millis(1)))) {
        return Outcome::closed(format!("setting the timeout: {e}"));
    }
    if let Err(e) = sock.send(UDP_PAYLOAD) {
        return Outcome::closed(io_words(&e));
    }
    let mut buf = [0u8; 512];
    match sock.recv(&mut buf) {
        Ok(_) => Outcome::open("reply"),
        Err(e) => Outcome::closed(io_words(&e)),
    }
}

fn io_words(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "timed out".into(),
        ErrorKind::ConnectionRefused => "refused".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_parse_in_any_case() {
        assert_eq!(Protocol::parse("tcp"), Some(Protocol::Tcp));
        assert_eq!(Protocol::parse("UDP"), Some(Protocol::Udp));
        assert_eq!(Protocol::parse("SCTP"), None);
    }

    /// In the test's own namespace (the path of this process's netns):
    /// a listener is open, a port nobody listens on is refused, and a UDP
    /// echo is open while a silent UDP port is closed.
    #[tokio::test]
    async fn probes_see_open_refused_and_udp_replies() {
        let here = PathBuf::from("/proc/self/ns/net");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = listener.local_addr().unwrap();
        let t = Duration::from_millis(500);
        let got = run(here.clone(), open, Protocol::Tcp, t).await.unwrap();
        assert_eq!(got, Outcome::open("connected"));
        drop(listener);
        let got = run(here.clone(), open, Protocol::Tcp, t).await.unwrap();
        assert_eq!(got, Outcome::closed("refused"));

        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut b = [0u8; 64];
            let (n, from) = echo.recv_from(&mut b).unwrap();
            echo.send_to(&b[..n], from).unwrap();
        });
        let got = run(here.clone(), echo_addr, Protocol::Udp, t)
            .await
            .unwrap();
        assert_eq!(got, Outcome::open("reply"));
        server.join().unwrap();
        // Nobody there any more: the kernel answers port unreachable.
        let got = run(here, echo_addr, Protocol::Udp, t).await.unwrap();
        assert!(!got.open, "{got:?}");
    }

    #[tokio::test]
    async fn a_missing_namespace_is_an_error_not_closed() {
        let e = run(
            PathBuf::from("/nonexistent/netns"),
            SocketAddr::from(([127, 0, 0, 1], 9)),
            Protocol::Tcp,
            Duration::from_millis(10),
        )
        .await;
        assert!(matches!(e, Err(ProbeError::Netns { .. })), "{e:?}");
    }
}
