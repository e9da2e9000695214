//! Service DNAT as kube-proxy's nftables mode writes it, for tests that send
//! pod traffic through ClusterIPs. Generation is pure (`ruleset`); `apply`
//! loads the rules into a network namespace with `nft -f -` and the returned
//! guard deletes the tables again.
//!
//! The layout follows kube-proxy (pkg/proxy/nftables) for what pod-to-Service
//! traffic meets: a table `ip kube-proxy` (and `ip6 kube-proxy`) whose
//! `services` chain is jumped to from `nat-prerouting` (prerouting, priority
//! dstnat) and `nat-output` (output, dstnat) and dispatches on
//! `ip daddr . meta l4proto . th dport` through the verdict map
//! `service-ips`; one chain per service port picks an endpoint with
//! `numgen random mod N` and jumps to one chain per endpoint, which marks
//! hairpin traffic for masquerading and `dnat`s to the endpoint. Service
//! ports without endpoints are rejected (`no-endpoint-services`), and so is
//! any other port of a ClusterIP (`cluster-ips-check`), from `filter-forward`
//! and `filter-output`. Masquerading (mark 0x4000, `masquerading` in
//! `nat-postrouting`) is as kube-proxy does it. Not generated: NodePorts,
//! external and load-balancer IPs, session affinity, firewalling.
use std::{
    io::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::NetNs;

/// A Service's L4 protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// One port of a Service and its endpoints: what kube-proxy makes one
/// `service-…` chain of.
#[derive(Clone, Debug)]
pub struct ServicePort {
    /// `namespace/name` of the Service.
    pub service: String,
    /// The port's name (kube-proxy names chains after it); may be empty.
    pub port_name: String,
    pub cluster_ip: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
    /// (pod address, target port), of the ClusterIP's family.
    pub endpoints: Vec<(IpAddr, u16)>,
}

impl ServicePort {
    pub fn new(
        service: &str,
        cluster_ip: IpAddr,
        protocol: Protocol,
        port: u16,
        endpoints: &[(IpAddr, u16)],
    ) -> Self {
        Self {
            service: service.to_owned(),
            port_name: format!("{}{port}", &protocol.name()[..1]),
            cluster_ip,
            protocol,
            port,
            endpoints: endpoints.to_vec(),
        }
    }

    /// `ns/name/proto/port-name`, as in kube-proxy's chain names.
    fn id(&self) -> String {
        format!(
            "{}/{}/{}",
            self.service,
            self.protocol.name(),
            self.port_name
        )
    }
}

/// `ip` or `ip6`: kube-proxy keeps one table per family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() { Self::V4 } else { Self::V6 }
    }

    /// The nft family and address-match keyword.
    fn nft(self) -> &'static str {
        match self {
            Self::V4 => "ip",
            Self::V6 => "ip6",
        }
    }

    fn addr_type(self) -> &'static str {
        match self {
            Self::V4 => "ipv4_addr",
            Self::V6 => "ipv6_addr",
        }
    }
}

/// A short stable hash in kube-proxy's style (8 base32 characters), so
/// chain names are unique even where the readable part is cut.
fn hash8(s: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    // FNV-1a, 64 bits.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (0..8)
        .map(|i| char::from(ALPHABET[((h >> (i * 5)) & 31) as usize]))
        .collect()
}

/// An address as part of a chain name (nft names take no ':').
fn name_part(ip: IpAddr) -> String {
    ip.to_string().replace(':', ".")
}

/// `addr:port` as `dnat to` takes it.
fn dnat_target(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// The nft transaction that (re)creates kube-proxy's table of `family` for
/// these service ports (those of the other family are left out).
/// `cluster_cidr` (of that family), when given, masquerades traffic to a
/// ClusterIP from outside it as kube-proxy's `--cluster-cidr` does. The
/// transaction first deletes any table of that name, so applying it again
/// replaces the rules atomically.
pub fn ruleset(family: Family, ports: &[ServicePort], cluster_cidr: Option<&str>) -> String {
    let f = family.nft();
    let t = format!("{f} kube-proxy");
    let addr = family.addr_type();
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}"
    ));
    line(format!("delete table {t}"));
    line(format!(
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}"
    ));
    // Sets and maps.
    line(format!(
        "add set {t} cluster-ips {{ type {addr} ; comment \"Active ClusterIPs\" ; }}"
    ));
    line(format!(
        "add map {t} service-ips {{ type {addr} . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    ));
    line(format!(
        "add map {t} no-endpoint-services {{ type {addr} . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
    ));
    // Base chains and helpers.
    for (chain, spec) in [
        (
            "nat-prerouting",
            Some("type nat hook prerouting priority -100"),
        ),
        ("nat-output", Some("type nat hook output priority -100")),
        (
            "nat-postrouting",
            Some("type nat hook postrouting priority 100"),
        ),
        (
            "filter-forward",
            Some("type filter hook forward priority 0"),
        ),
        ("filter-output", Some("type filter hook output priority 0")),
        ("services", None),
        ("mark-for-masquerade", None),
        ("masquerading", None),
        ("cluster-ips-check", None),
        ("service-endpoints-check", None),
        ("reject-chain", None),
    ] {
        match spec {
            Some(s) => line(format!("add chain {t} {chain} {{ {s} ; }}")),
            None => line(format!("add chain {t} {chain}")),
        }
    }
    line(format!("add rule {t} nat-prerouting jump services"));
    line(format!("add rule {t} nat-output jump services"));
    line(format!("add rule {t} nat-postrouting jump masquerading"));
    line(format!(
        "add rule {t} services {f} daddr . meta l4proto . th dport vmap @service-ips"
    ));
    line(format!(
        "add rule {t} mark-for-masquerade mark set mark or 0x4000"
    ));
    line(format!(
        "add rule {t} masquerading mark and 0x4000 == 0 return"
    ));
    line(format!(
        "add rule {t} masquerading mark set mark xor 0x4000"
    ));
    line(format!("add rule {t} masquerading masquerade fully-random"));
    for base in ["filter-forward", "filter-output"] {
        line(format!(
            "add rule {t} {base} ct state new jump service-endpoints-check"
        ));
        line(format!(
            "add rule {t} {base} ct state new jump cluster-ips-check"
        ));
    }
    line(format!(
        "add rule {t} service-endpoints-check {f} daddr . meta l4proto . th dport vmap @no-endpoint-services"
    ));
    line(format!(
        "add rule {t} cluster-ips-check {f} daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
    ));
    line(format!("add rule {t} reject-chain reject"));

    let ours: Vec<&ServicePort> = ports
        .iter()
        .filter(|p| Family::of(p.cluster_ip) == family)
        .collect();
    let mut cluster_ips: Vec<IpAddr> = ours.iter().map(|p| p.cluster_ip).collect();
    cluster_ips.sort();
    cluster_ips.dedup();
    for ip in cluster_ips {
        line(format!("add element {t} cluster-ips {{ {ip} }}"));
    }
    for p in ours {
        let id = p.id();
        let proto = p.protocol.name();
        let (ip, port) = (p.cluster_ip, p.port);
        if p.endpoints.is_empty() {
            line(format!(
                "add element {t} no-endpoint-services {{ {ip} . {proto} . {port} comment \"{}:{}\" : goto reject-chain }}",
                p.service, p.port_name
            ));
            continue;
        }
        let svc_chain = format!("service-{}-{id}", hash8(&id));
        line(format!("add chain {t} {svc_chain}"));
        if let Some(cidr) = cluster_cidr {
            line(format!(
                "add rule {t} {svc_chain} {f} daddr {ip} {f} saddr != {cidr} jump mark-for-masquerade"
            ));
        }
        let mut targets = Vec::new();
        for (i, (ep_ip, ep_port)) in p.endpoints.iter().enumerate() {
            let ep_id = format!("{id}__{}/{ep_port}", name_part(*ep_ip));
            let ep_chain = format!("endpoint-{}-{ep_id}", hash8(&ep_id));
            line(format!("add chain {t} {ep_chain}"));
            line(format!(
                "add rule {t} {ep_chain} {f} saddr {ep_ip} jump mark-for-masquerade"
            ));
            line(format!(
                "add rule {t} {ep_chain} meta l4proto {proto} dnat to {}",
                dnat_target(*ep_ip, *ep_port)
            ));
            targets.push(format!("{i} : goto {ep_chain}"));
        }
        line(format!(
            "add rule {t} {svc_chain} numgen random mod {} vmap {{ {} }}",
            targets.len(),
            targets.join(" , ")
        ));
        line(format!(
            "add element {t} service-ips {{ {ip} . {proto} . {port} : goto {svc_chain} }}"
        ));
    }
    out
}

/// kube-proxy's tables loaded in a namespace; deleted on drop (deleting the
/// namespace removes them too).
pub struct KubeProxy {
    netns: String,
    families: Vec<Family>,
}

fn nft(netns: &str, script: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft -f - in {netns}: {}\n--- script ---\n{script}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl KubeProxy {
    /// Writes the rules for `ports` into `ns`: one table per family that
    /// has ports. Applying again (the same guard) replaces them.
    pub fn apply(ns: &NetNs, ports: &[ServicePort]) -> Result<Self> {
        let mut kp = Self {
            netns: ns.name.clone(),
            families: Vec::new(),
        };
        kp.update(ports, None)?;
        Ok(kp)
    }

    /// Replaces the rules with those for `ports` (and `cluster_cidr`, one
    /// per family, e.g. `["10.0.0.0/8", "fd00::/8"]`).
    pub fn update(&mut self, ports: &[ServicePort], cluster_cidr: Option<[&str; 2]>) -> Result<()> {
        let mut script = String::new();
        let mut families = self.families.clone();
        for (family, cidr) in [
            (Family::V4, cluster_cidr.map(|c| c[0])),
            (Family::V6, cluster_cidr.map(|c| c[1])),
        ] {
            if ports.iter().any(|p| Family::of(p.cluster_ip) == family)
                || families.contains(&family)
            {
                script.push_str(&ruleset(family, ports, cidr));
                if !families.contains(&family) {
                    families.push(family);
                }
            }
        }
        nft(&self.netns, &script)?;
        self.families = families;
        Ok(())
    }

    /// The tables as `nft list` prints them (for failure messages).
    pub fn list(&self) -> String {
        let mut out = String::new();
        for f in &self.families {
            if let Ok(o) = Command::new("ip")
                .args(["netns", "exec", &self.netns, "nft", "list", "table"])
                .args([f.nft(), "kube-proxy"])
                .output()
            {
                out.push_str(&String::from_utf8_lossy(&o.stdout));
            }
        }
        out
    }
}

impl Drop for KubeProxy {
    fn drop(&mut self) {
        // A namespace already gone took the tables with it.
        if !std::path::Path::new("/run/netns")
            .join(&self.netns)
            .exists()
        {
            return;
        }
        for f in &self.families {
            let script = format!("delete table {} kube-proxy\n", f.nft());
            if let Err(e) = nft(&self.netns, &script) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect(s)
    }

    #[test]
    fn a_service_port_becomes_a_map_element_a_service_chain_and_one_chain_per_endpoint() {
        let p = ServicePort::new(
            "x/web",
            ip("10.96.0.10"),
            Protocol::Tcp,
            80,
            &[(ip("10.1.0.5"), 8080), (ip("10.1.0.6"), 8080)],
        );
        let r = ruleset(Family::V4, &[p], Some("10.0.0.0/8"));
        let svc = format!("service-{}-x/web/tcp/t80", hash8("x/web/tcp/t80"));
        assert!(r.contains(
            "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips"
        ));
        assert!(r.contains("type nat hook prerouting priority -100"));
        assert!(r.contains(&format!(
            "add element ip kube-proxy service-ips {{ 10.96.0.10 . tcp . 80 : goto {svc} }}"
        )));
        assert!(r.contains(&format!(
            "add rule ip kube-proxy {svc} ip daddr 10.96.0.10 ip saddr != 10.0.0.0/8 jump mark-for-masquerade"
        )));
        assert!(r.contains(&format!(
            "add rule ip kube-proxy {svc} numgen random mod 2 vmap {{ 0 : goto endpoint-"
        )));
        assert!(r.contains("meta l4proto tcp dnat to 10.1.0.5:8080"));
        assert!(r.contains("meta l4proto tcp dnat to 10.1.0.6:8080"));
        assert!(r.contains("ip saddr 10.1.0.6 jump mark-for-masquerade"));
        assert!(r.contains("add element ip kube-proxy cluster-ips { 10.96.0.10 }"));
        // Every chain is added before a rule refers to it.
        let first_use = r.find(&format!("goto {svc}")).expect("the chain is used");
        let defined = r
            .find(&format!("add chain ip kube-proxy {svc}"))
            .expect("the chain is added");
        assert!(defined < first_use);
    }

    #[test]
    fn each_family_gets_its_own_table_and_only_its_own_ports() {
        let ports = [
            ServicePort::new(
                "x/dns",
                ip("10.96.0.53"),
                Protocol::Udp,
                53,
                &[(ip("10.1.0.9"), 53)],
            ),
            ServicePort::new(
                "x/dns",
                ip("fd00:96::35"),
                Protocol::Udp,
                53,
                &[(ip("fd00:1::9"), 53)],
            ),
        ];
        let v6 = ruleset(Family::V6, &ports, None);
        assert!(v6.contains("add table ip6 kube-proxy"));
        assert!(v6.contains("ip6 daddr . meta l4proto . th dport vmap @service-ips"));
        assert!(v6.contains("type ipv6_addr . inet_proto . inet_service : verdict"));
        assert!(v6.contains("meta l4proto udp dnat to [fd00:1::9]:53"));
        assert!(v6.contains("__fd00.1..9/53"), "no ':' in chain names");
        assert!(!v6.contains("10.96.0.53"));
        let v4 = ruleset(Family::V4, &ports, None);
        assert!(!v4.contains("fd00"));
        assert!(
            !v4.contains("saddr !="),
            "no cluster CIDR, no masquerade rule"
        );
    }

    #[test]
    fn a_port_without_endpoints_is_rejected_not_translated() {
        let p = ServicePort::new("x/none", ip("10.96.0.11"), Protocol::Tcp, 80, &[]);
        let r = ruleset(Family::V4, &[p], None);
        assert!(r.contains(
            "add element ip kube-proxy no-endpoint-services { 10.96.0.11 . tcp . 80 comment \"x/none:t80\" : goto reject-chain }"
        ));
        assert!(!r.contains("service-ips { 10.96.0.11"));
    }
}
