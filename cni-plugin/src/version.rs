//! CNI spec versions this plugin speaks and how one is chosen.
use std::fmt;

use serde::Serialize;

use crate::{Error, Result};

/// Versions are ordered, so `v >= Version::V1_1_0` reads as in the spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    /// CHECK and prevResult on DEL; `ips[].version` present.
    V0_4_0,
    /// `ips[].version` gone.
    V1_0_0,
    /// STATUS, GC, `cniVersions`, route `scope`/`table`/..., interface `mtu`.
    V1_1_0,
}

pub const SUPPORTED: [Version; 3] = [Version::V0_4_0, Version::V1_0_0, Version::V1_1_0];
pub const LATEST: Version = Version::V1_1_0;

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        SUPPORTED.into_iter().find(|v| v.as_str() == s)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The version a request is served in. `cniVersion`, when present, is what
/// the runtime chose and must be one we speak. Without it, the highest
/// supported entry of `cniVersions` wins (SPEC.md "Version considerations").
pub fn negotiate(cni_version: Option<&str>, cni_versions: &[String]) -> Result<Version> {
    if let Some(v) = cni_version {
        return Version::parse(v).ok_or_else(|| {
            Error::IncompatibleVersion(format!(
                "cniVersion {v:?} is not supported; supported: {}",
                supported_list()
            ))
        });
    }
    if cni_versions.is_empty() {
        return Err(Error::IncompatibleVersion(
            "neither cniVersion nor cniVersions is set".into(),
        ));
    }
    cni_versions
        .iter()
        .filter_map(|v| Version::parse(v))
        .max()
        .ok_or_else(|| {
            Error::IncompatibleVersion(format!(
                "none of cniVersions {cni_versions:?} is supported; supported: {}",
                supported_list()
            ))
        })
}

fn supported_list() -> String {
    SUPPORTED.map(Version::as_str).join(", ")
}

/// Output of the VERSION verb.
#[derive(Debug, Serialize)]
pub struct VersionInfo {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(rename = "supportedVersions")]
    pub supported_versions: Vec<&'static str>,
}

/// VERSION echoes the `cniVersion` it was given (the latest when stdin is
/// empty or carries none) and lists what we speak.
pub fn version_info(stdin_version: Option<&str>) -> VersionInfo {
    VersionInfo {
        cni_version: stdin_version.unwrap_or(LATEST.as_str()).to_string(),
        supported_versions: SUPPORTED.map(Version::as_str).to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn cni_version_wins_when_present() {
        assert_eq!(
            negotiate(Some("0.4.0"), &list(&["1.1.0"])).ok(),
            Some(Version::V0_4_0)
        );
    }

    #[test]
    fn unsupported_cni_version_is_error_1() {
        for v in ["0.3.1", "2.0.0", "1.1", ""] {
            let e = negotiate(Some(v), &[]).err();
            assert_eq!(e.map(|e| e.code()), Some(1), "{v}");
        }
    }

    #[test]
    fn highest_supported_of_cni_versions_is_picked_without_cni_version() {
        let got = negotiate(None, &list(&["0.3.1", "1.0.0", "0.4.0", "9.9.9"]));
        assert_eq!(got.ok(), Some(Version::V1_0_0));
    }

    #[test]
    fn cni_versions_with_nothing_supported_is_error_1() {
        let e = negotiate(None, &list(&["0.2.0", "0.3.1"])).err();
        assert_eq!(e.map(|e| e.code()), Some(1));
        assert_eq!(negotiate(None, &[]).err().map(|e| e.code()), Some(1));
    }

    #[test]
    fn versions_are_ordered_like_the_spec() {
        assert!(Version::V0_4_0 < Version::V1_0_0 && Version::V1_0_0 < Version::V1_1_0);
    }

    #[test]
    fn version_info_echoes_the_input_version() {
        assert_eq!(version_info(Some("1.0.0")).cni_version, "1.0.0");
        assert_eq!(version_info(None).cni_version, "1.1.0");
        assert_eq!(
            version_info(None).supported_versions,
            ["0.4.0", "1.0.0", "1.1.0"]
        );
    }
}
