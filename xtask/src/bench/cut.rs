//! `bench propagation`'s apply-to-cut: how long after the API write of a
//! policy change that denies them established flows stop
//! (docs/design.md, "Policy changes reach established flows").
//!
//! Per round: the toggled policy allows the client (TCP and UDP
//! `CUT_PORT`); a TCP connection (no Nagle) and a connected UDP socket from
//! the client each send one small packet every millisecond; then the
//! policy is updated to allow nothing. The time of the first dropped packet
//! of each flow is the `ktime_ns` of the agent's `revoked` drop event
//! (bpf_ktime_get_ns, CLOCK_MONOTONIC), against CLOCK_MONOTONIC read just
//! before the API write: resolution the 1 ms send interval.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Result;
use nix::time::{ClockId, clock_gettime};
use sluice_tests::{NetNs, Node, eventually};

/// The port of the cut flows (TCP and UDP), served apart from the probes'.
pub const CUT_PORT: u16 = 8081;
const GIVE_UP: Duration = Duration::from_secs(10);
const SEND_EVERY: Duration = Duration::from_millis(1);

/// One round: ms from the API write to the first dropped packet of the
/// TCP connection and of the UDP flow; `None` when not seen in GIVE_UP.
pub type Sample = (Option<f64>, Option<f64>);

fn mono_ns() -> Result<u64> {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC)?;
    Ok(u64::try_from(t.tv_sec())? * 1_000_000_000 + u64::try_from(t.tv_nsec())?)
}

/// The server end: accepts and reads (keeps connections open), and a UDP
/// socket that takes datagrams (never read: no port-unreachable errors).
struct Sink {
    stop: Arc<AtomicBool>,
    listener: TcpListener,
    _udp: UdpSocket,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    fn start(ns: &NetNs) -> Result<Self> {
        let (listener, udp) = ns.run(|| -> std::io::Result<(TcpListener, UdpSocket)> {
            let any = SocketAddr::from(([0, 0, 0, 0], CUT_PORT));
            Ok((TcpListener::bind(any)?, UdpSocket::bind(any)?))
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let (s, l) = (stop.clone(), listener.try_clone()?);
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((mut c, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                };
                std::thread::spawn(move || {
                    let _ignored = c.set_read_timeout(Some(GIVE_UP));
                    let mut b = [0u8; 512];
                    while matches!(c.read(&mut b), Ok(n) if n > 0) {}
                });
            }
        });
        Ok(Self {
            stop,
            listener,
            _udp: udp,
            thread: Some(thread),
        })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Makes the blocked accept() return.
        let _ignored = socket2::SockRef::from(&self.listener).shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ignored = t.join();
        }
    }
}

/// The client's two flows, sending until dropped.
struct Senders {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    tcp_port: u16,
    udp_port: u16,
}

impl Senders {
    fn start(ns: &NetNs, to: IpAddr) -> Result<Self> {
        let to = SocketAddr::new(to, CUT_PORT);
        let (mut tcp, udp) = ns.run(move || -> std::io::Result<(TcpStream, UdpSocket)> {
            let tcp = TcpStream::connect_timeout(&to, Duration::from_secs(1))?;
            tcp.set_nodelay(true)?;
            let udp = UdpSocket::bind("0.0.0.0:0")?;
            udp.connect(to)?;
            Ok((tcp, udp))
        })??;
        let (tcp_port, udp_port) = (tcp.local_addr()?.port(), udp.local_addr()?.port());
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let _ignored = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
            while !s.load(Ordering::Relaxed) {
                // Errors (a full send buffer, unreachable) are what is
                // measured elsewhere: keep sending.
                let _ignored = tcp.write(&[1]);
                let _ignored = udp.send(&[1]);
                std::thread::sleep(SEND_EVERY);
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
            tcp_port,
            udp_port,
        })
    }
}

impl Drop for Senders {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ignored = t.join();
        }
    }
}

/// The earliest `revoked` drop event of the client's flow from `port`
/// after `t0`, in ms after `t0`.
fn first_cut(node: &Node, protocol: &str, port: u16, t0: u64) -> Option<f64> {
    let mut first = None;
    let seen = eventually(GIVE_UP, || {
        let at = node
            .events_matching(|e| {
                e["reason"] == "revoked" && e["protocol"] == protocol && e["src_port"] == port
            })
            .iter()
            .filter_map(|e| e["ktime_ns"].as_u64())
            .filter(|&t| t >= t0)
            .min();
        first = at;
        at.is_some()
    });
    if !seen {
        return None;
    }
    first.map(|t| (t - t0) as f64 / 1e6)
}

/// `rounds` cuts. `set_policy(allow)` writes the toggled policy (allowing
/// the client TCP and UDP `CUT_PORT`, or nothing) and returns its
/// resourceVersion; `key` is its key in `Programmed`.
pub fn measure(
    node: &Node,
    key: &str,
    (client, server): (&NetNs, &NetNs),
    to: IpAddr,
    rounds: usize,
    set_policy: &mut dyn FnMut(bool) -> Result<String>,
) -> Result<Vec<Sample>> {
    let _sink = Sink::start(server)?;
    let mut out = Vec::new();
    for _ in 0..rounds {
        let rv = set_policy(true)?;
        node.wait_programmed(key, Some(&rv), GIVE_UP)?;
        let senders = Senders::start(client, to)?;
        // Both flows established and tracked in the current epoch.
        std::thread::sleep(Duration::from_millis(30));
        let t0 = mono_ns()?;
        let rv = set_policy(false)?;
        let tcp = first_cut(node, "TCP", senders.tcp_port, t0);
        let udp = first_cut(node, "UDP", senders.udp_port, t0);
        drop(senders);
        node.wait_programmed(key, Some(&rv), GIVE_UP)?;
        out.push((tcp, udp));
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(out)
}
