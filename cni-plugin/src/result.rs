//! The ADD result (SPEC.md section 5), built without I/O.
//!
//! Unknown fields of a prevResult are kept (`extra`), so a chained result
//! passes through whatever earlier plugins put in it.
use std::fmt::Display;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::topology::{self, SCOPE_LINK};
use crate::version::Version;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// Always printed, `{}` when empty, like libcni's results.
    #[serde(default = "empty_object")]
    pub dns: Value,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// 1.1.0 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    /// "4" or "6"; 0.4.0 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(with = "as_string")]
    pub address: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Route {
    #[serde(with = "as_string")]
    pub dst: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    // The rest is 1.1.0 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u8>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

/// One veth end as the result reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// What ADD did, in the terms of the result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub host: LinkInfo,
    pub pod: LinkInfo,
    /// CNI_NETNS, reported as the pod interface's sandbox.
    pub netns: String,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The ADD result: `prev` (a chained prevResult) passed through and
/// extended with our two interfaces, addresses and routes, in `version`.
pub fn build(version: Version, prev: Option<CniResult>, a: &Attached) -> CniResult {
    let mut r = prev.unwrap_or_else(|| CniResult {
        cni_version: String::new(),
        interfaces: Vec::new(),
        ips: Vec::new(),
        routes: Vec::new(),
        dns: empty_object(),
        extra: Map::new(),
    });
    r.interfaces.push(Interface {
        name: a.host.name.clone(),
        mac: Some(format_mac(&a.host.mac)),
        mtu: Some(a.host.mtu),
        sandbox: None,
        extra: Map::new(),
    });
    let pod_index = r.interfaces.len();
    r.interfaces.push(Interface {
        name: a.pod.name.clone(),
        mac: Some(format_mac(&a.pod.mac)),
        mtu: Some(a.pod.mtu),
        sandbox: Some(a.netns.clone()),
        extra: Map::new(),
    });
    let ours = a
        .ipv4
        .map(IpAddr::V4)
        .into_iter()
        .chain(a.ipv6.map(IpAddr::V6));
    for ip in ours {
        r.ips.push(IpConfig {
            version: None,
            address: topology::host_net(ip),
            gateway: Some(topology::gateway_for(ip)),
            interface: Some(pod_index),
            extra: Map::new(),
        });
    }
    for pr in topology::pod_routes(a.ipv4.is_some(), a.ipv6.is_some()) {
        // Before 1.1.0 a route cannot say "scope link", and a route without
        // gw would read as "via the ips gateway": leave it out there.
        if pr.link_scope && version < Version::V1_1_0 {
            continue;
        }
        r.routes.push(Route {
            dst: pr.dst,
            gw: pr.gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: pr.link_scope.then_some(SCOPE_LINK),
            extra: Map::new(),
        });
    }
    in_version(r, version)
}

/// `r` in the shape of `version`: `ips[].version` only in 0.4.0, the 1.1.0
/// fields only in 1.1.0.
pub fn in_version(mut r: CniResult, version: Version) -> CniResult {
    r.cni_version = version.as_str().to_string();
    for ip in &mut r.ips {
        ip.version = (version == Version::V0_4_0)
            .then(|| if ip.address.is_ipv4() { "4" } else { "6" }.to_string());
    }
    if version < Version::V1_1_0 {
        for i in &mut r.interfaces {
            i.mtu = None;
        }
        for rt in &mut r.routes {
            rt.mtu = None;
            rt.advmss = None;
            rt.priority = None;
            rt.table = None;
            rt.scope = None;
        }
    }
    r
}

impl CniResult {
    /// Index and entry of the sandbox interface named `ifname`.
    pub fn pod_interface(&self, ifname: &str) -> Option<(usize, &Interface)> {
        self.interfaces
            .iter()
            .enumerate()
            .find(|(_, i)| i.name == ifname && i.sandbox.as_deref().is_some_and(|s| !s.is_empty()))
    }

    /// Addresses assigned to interface `index`.
    pub fn ips_of(&self, index: usize) -> impl Iterator<Item = &IpConfig> {
        self.ips
            .iter()
            .filter(move |ip| ip.interface == Some(index))
    }
}

mod as_string {
    use super::*;

    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn attached(v4: bool, v6: bool) -> Attached {
        Attached {
            host: LinkInfo {
                name: "sl0123456789ab".into(),
                mac: [0xee, 0, 0, 0, 0, 1],
                mtu: 1500,
            },
            pod: LinkInfo {
                name: "eth0".into(),
                mac: [0x0a, 0, 0, 0, 0, 2],
                mtu: 1500,
            },
            netns: "/run/netns/p".into(),
            ipv4: v4.then(|| Ipv4Addr::new(10, 244, 1, 5)),
            ipv6: v6.then(|| "fd00::5".parse().unwrap()),
        }
    }

    fn json_of(r: &CniResult) -> Value {
        serde_json::to_value(r).unwrap()
    }

    #[test]
    fn a_1_1_0_dual_stack_result_has_everything() {
        let r = json_of(&build(Version::V1_1_0, None, &attached(true, true)));
        assert_eq!(
            r,
            json!({
                "cniVersion": "1.1.0",
                "interfaces": [
                    {"name": "sl0123456789ab", "mac": "ee:00:00:00:00:01", "mtu": 1500},
                    {"name": "eth0", "mac": "0a:00:00:00:00:02", "mtu": 1500, "sandbox": "/run/netns/p"}
                ],
                "ips": [
                    {"address": "10.244.1.5/32", "gateway": "169.254.1.1", "interface": 1},
                    {"address": "fd00::5/128", "gateway": "fe80::1", "interface": 1}
                ],
                "routes": [
                    {"dst": "169.254.1.1/32", "scope": 253},
                    {"dst": "0.0.0.0/0", "gw": "169.254.1.1"},
                    {"dst": "::/0", "gw": "fe80::1"}
                ],
                "dns": {}
            })
        );
    }

    #[test]
    fn a_0_4_0_result_has_ip_versions_and_no_1_1_fields() {
        let r = json_of(&build(Version::V0_4_0, None, &attached(true, true)));
        assert_eq!(r["ips"][0]["version"], "4");
        assert_eq!(r["ips"][1]["version"], "6");
        assert!(r["interfaces"][0].get("mtu").is_none());
        assert_eq!(r["routes"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn a_1_0_0_result_has_no_ip_versions() {
        let r = json_of(&build(Version::V1_0_0, None, &attached(false, true)));
        assert!(r["ips"][0].get("version").is_none());
        assert_eq!(r["routes"], json!([{"dst": "::/0", "gw": "fe80::1"}]));
    }

    /// The keys of a 1.0.0 result (SPEC.md 1.0.0, libcni types/100, what
    /// containerd 1.6/1.7 parse) per object.
    fn keys_outside_1_0_0(r: &Value) -> Vec<String> {
        let allowed = |obj: &Value, keys: &[&str], at: &str, out: &mut Vec<String>| {
            for k in obj.as_object().into_iter().flat_map(|o| o.keys()) {
                if !keys.contains(&k.as_str()) {
                    out.push(format!("{at}.{k}"));
                }
            }
        };
        let mut out = Vec::new();
        allowed(
            r,
            &["cniVersion", "interfaces", "ips", "routes", "dns"],
            "",
            &mut out,
        );
        for i in r["interfaces"].as_array().into_iter().flatten() {
            allowed(i, &["name", "mac", "sandbox"], "interfaces[]", &mut out);
        }
        for i in r["ips"].as_array().into_iter().flatten() {
            allowed(i, &["address", "gateway", "interface"], "ips[]", &mut out);
        }
        for i in r["routes"].as_array().into_iter().flatten() {
            allowed(i, &["dst", "gw"], "routes[]", &mut out);
        }
        allowed(
            &r["dns"],
            &["nameservers", "domain", "search", "options"],
            "dns",
            &mut out,
        );
        out
    }

    #[test]
    fn a_1_0_0_result_has_only_what_a_1_0_0_parser_knows() {
        for (v4, v6) in [(true, false), (false, true), (true, true)] {
            let r = json_of(&build(Version::V1_0_0, None, &attached(v4, v6)));
            assert_eq!(r["cniVersion"], "1.0.0");
            assert_eq!(keys_outside_1_0_0(&r), Vec::<String>::new(), "{r}");
            // Every address and default route is still there.
            assert_eq!(
                r["ips"].as_array().map(Vec::len),
                Some(usize::from(v4) + usize::from(v6))
            );
            assert_eq!(
                r["routes"].as_array().map(Vec::len),
                Some(usize::from(v4) + usize::from(v6))
            );
        }
        // The same pod in 1.1.0 has fields a 1.0.0 parser does not know:
        // the check above can fail.
        let r = json_of(&build(Version::V1_1_0, None, &attached(true, true)));
        assert_eq!(
            keys_outside_1_0_0(&r),
            ["interfaces[].mtu", "interfaces[].mtu", "routes[].scope"]
        );
    }

    #[test]
    fn a_1_1_0_prev_result_is_narrowed_to_1_0_0() {
        let prev = build(Version::V1_1_0, None, &attached(true, false));
        let r = json_of(&in_version(prev, Version::V1_0_0));
        assert_eq!(r["cniVersion"], "1.0.0");
        assert_eq!(keys_outside_1_0_0(&r), Vec::<String>::new(), "{r}");
    }

    #[test]
    fn a_prev_result_is_passed_through_and_extended() {
        let prev: CniResult = serde_json::from_value(json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "dummy0", "socketPath": "/x"}],
            "ips": [{"version": "4", "address": "192.0.2.9/24", "interface": 0}],
            "routes": [{"dst": "198.51.100.0/24", "gw": "192.0.2.1"}],
            "dns": {"nameservers": ["10.96.0.10"]},
            "custom": true
        }))
        .unwrap();
        let r = json_of(&build(Version::V0_4_0, Some(prev), &attached(true, false)));
        assert_eq!(
            r["interfaces"][0],
            json!({"name": "dummy0", "socketPath": "/x"})
        );
        assert_eq!(r["interfaces"][2]["name"], "eth0");
        assert_eq!(r["ips"][0]["address"], "192.0.2.9/24");
        assert_eq!(r["ips"][1]["interface"], 2);
        assert_eq!(r["routes"][0]["dst"], "198.51.100.0/24");
        assert_eq!(r["dns"]["nameservers"][0], "10.96.0.10");
        assert_eq!(r["custom"], true);
        assert_eq!(r["cniVersion"], "0.4.0");
    }

    #[test]
    fn the_pod_interface_is_found_by_name_and_sandbox() {
        let r = build(Version::V1_1_0, None, &attached(true, true));
        let (i, _) = r.pod_interface("eth0").unwrap();
        assert_eq!(i, 1);
        assert_eq!(r.ips_of(i).count(), 2);
        assert!(r.pod_interface("sl0123456789ab").is_none());
    }

    #[test]
    fn bad_addresses_in_a_prev_result_do_not_parse() {
        let bad = serde_json::from_value::<CniResult>(json!({"ips": [{"address": "x"}]}));
        assert!(bad.is_err());
    }
}
