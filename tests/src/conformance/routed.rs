//! The routed topology's wiring: two nodes in their own subnets behind a
//! router namespace (test code: `ip` is fine here).
use anyhow::Result;

use super::{Topology, link_ips};
use crate::{NetNs, Node};

/// The routed topology: node `i` in 10.253.{i+1}.0/24 and
/// fd00:253:{i+1}::/64 on a veth to the router, which has .1 / ::1 there
/// and forwards; each node's default routes go via the router.
pub(super) fn wire_routed(router: &NetNs, nodes: &[Node]) -> Result<()> {
    router.sysctl("net.ipv4.ip_forward", "1")?;
    router.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    for (i, node) in nodes.iter().enumerate() {
        let (a, b) = super::veth_between(&node.ns.name, &router.name, "slr")?;
        let (v4, v6) = link_ips(Topology::Routed, i);
        let (r4, r6) = (
            format!("10.253.{}.1", i + 1),
            format!("fd00:253:{}::1", i + 1),
        );
        router.ip(&["addr", "add", &format!("{r4}/24"), "dev", &b])?;
        router.ip(&["addr", "add", &format!("{r6}/64"), "dev", &b, "nodad"])?;
        router.ip(&["link", "set", &b, "up"])?;
        let n = &node.ns;
        n.ip(&["addr", "add", &format!("{v4}/24"), "dev", &a])?;
        n.ip(&["addr", "add", &format!("{v6}/64"), "dev", &a, "nodad"])?;
        n.ip(&["link", "set", &a, "up"])?;
        n.ip(&["route", "add", "default", "via", &r4, "dev", &a])?;
        n.ip(&["-6", "route", "add", "default", "via", &r6, "dev", &a])?;
    }
    Ok(())
}
