//! The CNI_* environment variables, parsed and validated without I/O (the
//! caller passes a lookup function, `std::env::var` in `main`).
use std::path::PathBuf;

use sluice_proto::Attachment;

use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            _ => return None,
        })
    }
}

/// The K8S_* keys of CNI_ARGS, as containerd and CRI-O pass them:
/// `IgnoreUnknown=1;K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;
/// K8S_POD_INFRA_CONTAINER_ID=..;K8S_POD_UID=..`. The pod's namespace and
/// name identify the endpoint to the agent; the sandbox id and UID only go
/// into log lines. Any other key is ignored whether or not `IgnoreUnknown`
/// is set (libcni's plugins refuse unknown keys without it; refusing a
/// pod over an argument this plugin has no use for helps nobody).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub infra_container_id: Option<String>,
    pub pod_uid: Option<String>,
}

/// What the runtime passed for one attachment-specific verb.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachmentEnv {
    pub container_id: String,
    pub ifname: String,
    /// None when CNI_NETNS is unset or empty (allowed for DEL only).
    pub netns: Option<PathBuf>,
    pub args: CniArgs,
}

impl AttachmentEnv {
    pub fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }

    /// CNI_NETNS, for the verbs that require it.
    pub fn netns(&self) -> Result<&PathBuf> {
        self.netns.as_ref().ok_or(Error::InvalidEnv {
            name: "CNI_NETNS",
            reason: "must be set".into(),
        })
    }
}

pub fn command(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Command> {
    let raw = lookup("CNI_COMMAND").ok_or(Error::InvalidEnv {
        name: "CNI_COMMAND",
        reason: "must be set".into(),
    })?;
    Command::parse(&raw).ok_or(Error::InvalidEnv {
        name: "CNI_COMMAND",
        reason: format!("unknown command {raw:?}"),
    })
}

/// Reads the attachment variables of ADD, CHECK (netns required) and DEL
/// (netns optional: containerd's second DEL comes without one).
pub fn attachment(
    lookup: &dyn Fn(&str) -> Option<String>,
    netns_required: bool,
) -> Result<AttachmentEnv> {
    let container_id = lookup("CNI_CONTAINERID").unwrap_or_default();
    validate_container_id(&container_id).map_err(|reason| Error::InvalidEnv {
        name: "CNI_CONTAINERID",
        reason,
    })?;
    let ifname = lookup("CNI_IFNAME").unwrap_or_default();
    validate_ifname(&ifname).map_err(|reason| Error::InvalidEnv {
        name: "CNI_IFNAME",
        reason,
    })?;
    let netns = lookup("CNI_NETNS")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from);
    if netns_required && netns.is_none() {
        return Err(Error::InvalidEnv {
            name: "CNI_NETNS",
            reason: "must be set".into(),
        });
    }
    if let Some(p) = &netns
        && !p.is_absolute()
    {
        return Err(Error::InvalidEnv {
            name: "CNI_NETNS",
            reason: format!("{} is not an absolute path", p.display()),
        });
    }
    let args = parse_args(&lookup("CNI_ARGS").unwrap_or_default())?;
    Ok(AttachmentEnv {
        container_id,
        ifname,
        netns,
        args,
    })
}

/// CNI_ARGS: "K1=V1;K2=V2". A pair without '=' is an error (code 4).
pub fn parse_args(raw: &str) -> Result<CniArgs> {
    let mut args = CniArgs::default();
    for pair in raw.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| Error::InvalidEnv {
            name: "CNI_ARGS",
            reason: format!("{pair:?} is not KEY=VALUE"),
        })?;
        match k {
            "K8S_POD_NAMESPACE" if !v.is_empty() => args.pod_namespace = Some(v.to_string()),
            "K8S_POD_NAME" if !v.is_empty() => args.pod_name = Some(v.to_string()),
            "K8S_POD_INFRA_CONTAINER_ID" if !v.is_empty() => {
                args.infra_container_id = Some(v.to_string());
            }
            "K8S_POD_UID" if !v.is_empty() => args.pod_uid = Some(v.to_string()),
            _ => {}
        }
    }
    Ok(args)
}

/// SPEC.md: not empty, starts with an alphanumeric character, then
/// alphanumerics, '_', '.' or '-'.
pub fn validate_container_id(id: &str) -> std::result::Result<(), String> {
    let mut chars = id.chars();
    match chars.next() {
        None => return Err("must be set and not empty".into()),
        Some(c) if !c.is_ascii_alphanumeric() => {
            return Err(format!("{id:?} must start with an alphanumeric character"));
        }
        Some(_) => {}
    }
    if chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        Ok(())
    } else {
        Err(format!(
            "{id:?} may contain only alphanumerics, '_', '.' and '-'"
        ))
    }
}

/// Linux interface names: 1 to 15 bytes, not "." or "..", no '/', ':' or
/// whitespace.
pub fn validate_ifname(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("must be set and not empty".into());
    }
    if name.len() > 15 {
        return Err(format!("{name:?} is longer than 15 bytes"));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
    {
        return Err(format!("{name:?} contains '/', ':' or whitespace"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn every_verb_parses_and_unknown_ones_are_error_4() {
        for (s, c) in [
            ("ADD", Command::Add),
            ("DEL", Command::Del),
            ("CHECK", Command::Check),
            ("VERSION", Command::Version),
            ("STATUS", Command::Status),
            ("GC", Command::Gc),
        ] {
            assert_eq!(command(&env(&[("CNI_COMMAND", s)])).ok(), Some(c));
        }
        assert_eq!(
            command(&env(&[("CNI_COMMAND", "add")]))
                .err()
                .map(|e| e.code()),
            Some(4)
        );
        assert_eq!(command(&env(&[])).err().map(|e| e.code()), Some(4));
    }

    #[test]
    fn add_reads_the_attachment_and_pod_identity() {
        let e = env(&[
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/run/netns/p"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
            ),
        ]);
        let a = attachment(&e, true).ok();
        let a = a.as_ref();
        assert_eq!(a.map(|a| a.container_id.as_str()), Some("abc123"));
        assert_eq!(a.and_then(|a| a.args.pod_name.as_deref()), Some("web-0"));
        assert_eq!(
            a.and_then(|a| a.args.pod_namespace.as_deref()),
            Some("default")
        );
    }

    #[test]
    fn del_accepts_an_empty_or_missing_netns() {
        for pairs in [
            vec![
                ("CNI_CONTAINERID", "c"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", ""),
            ],
            vec![("CNI_CONTAINERID", "c"), ("CNI_IFNAME", "eth0")],
        ] {
            let a = attachment(&env(&pairs), false);
            assert_eq!(a.ok().map(|a| a.netns), Some(None));
        }
    }

    #[test]
    fn add_without_netns_or_with_bad_ids_is_error_4_naming_the_variable() {
        let cases: [&[(&str, &str)]; 5] = [
            &[("CNI_CONTAINERID", "c"), ("CNI_IFNAME", "eth0")],
            &[("CNI_IFNAME", "eth0"), ("CNI_NETNS", "/n")],
            &[
                ("CNI_CONTAINERID", "-c"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/n"),
            ],
            &[
                ("CNI_CONTAINERID", "c"),
                ("CNI_IFNAME", "a/b"),
                ("CNI_NETNS", "/n"),
            ],
            &[
                ("CNI_CONTAINERID", "c"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "rel"),
            ],
        ];
        for pairs in cases {
            let e = attachment(&env(pairs), true).err();
            assert_eq!(e.as_ref().map(Error::code), Some(4), "{pairs:?}");
            assert!(e.map(|e| e.to_string().contains("CNI_")).unwrap_or(false));
        }
    }

    #[test]
    fn interface_names_follow_linux_rules() {
        assert!(validate_ifname("eth0").is_ok());
        assert!(validate_ifname("abcdefghijklmno").is_ok());
        for bad in ["", ".", "..", "abcdefghijklmnop", "a b", "a:b", "a/b"] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn containerds_cni_args_are_read_and_unknown_keys_ignored() {
        let a = parse_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-5d78c9869d-x7x2q;\
             K8S_POD_INFRA_CONTAINER_ID=4f1c0e5b9a;K8S_POD_UID=0c9d8a3e-7f61-4a0b-9d1e-2b3c4d5e6f70",
        );
        assert_eq!(
            a.ok(),
            Some(CniArgs {
                pod_namespace: Some("kube-system".into()),
                pod_name: Some("coredns-5d78c9869d-x7x2q".into()),
                infra_container_id: Some("4f1c0e5b9a".into()),
                pod_uid: Some("0c9d8a3e-7f61-4a0b-9d1e-2b3c4d5e6f70".into()),
            })
        );
        // Without IgnoreUnknown, unknown keys are still ignored; empty
        // values count as unset; a value may contain '='.
        let a = parse_args("FOO=bar;K8S_POD_NAME=;K8S_POD_NAMESPACE=a=b").ok();
        assert_eq!(a.as_ref().and_then(|a| a.pod_name.clone()), None);
        assert_eq!(a.and_then(|a| a.pod_namespace), Some("a=b".into()));
    }

    #[test]
    fn cni_args_pairs_must_have_an_equals_sign() {
        assert_eq!(parse_args("A=1;;B=2").ok(), Some(CniArgs::default()));
        assert_eq!(parse_args("A").err().map(|e| e.code()), Some(4));
    }
}
