//! Where one ADD's (or DEL's) time went: each step's duration, and the
//! agent's own split of its answer to ADD. Printed to stderr as one JSON line (`sluice
//! phases {..}`) when `SLUICE_CNI_PHASES=1`, which `bench cni` sets; a
//! runtime never does, and the line would only reach its logs.
use std::time::Instant;

use sluice_proto::AddPhases;

/// The environment variable that asks for the line.
pub const ENV: &str = "SLUICE_CNI_PHASES";

pub struct Phases {
    last: Instant,
    steps: Vec<(&'static str, u64)>,
    pub agent: Option<AddPhases>,
}

impl Phases {
    pub fn start() -> Self {
        Self {
            last: Instant::now(),
            steps: Vec::new(),
            agent: None,
        }
    }

    /// Ends step `name`, which began where the previous one ended.
    pub fn lap(&mut self, name: &'static str) {
        let now = Instant::now();
        let us = u64::try_from(now.duration_since(self.last).as_micros()).unwrap_or(u64::MAX);
        self.steps.push((name, us));
        self.last = now;
    }

    /// `{"steps_us": {"ipam": .., ..}, "agent": {..}}`
    pub fn to_json(&self) -> String {
        let steps: serde_json::Map<String, serde_json::Value> = self
            .steps
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).into()))
            .collect();
        serde_json::json!({"steps_us": steps, "agent": self.agent}).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_comes_out_with_its_duration_and_the_agents_split() {
        let mut p = Phases::start();
        p.lap("ipam");
        std::thread::sleep(std::time::Duration::from_millis(2));
        p.lap("veth");
        p.agent = Some(AddPhases {
            attach_us: 7,
            ..AddPhases::default()
        });
        let v: serde_json::Value = serde_json::from_str(&p.to_json()).unwrap();
        let steps = v["steps_us"].as_object().unwrap();
        assert_eq!(steps.len(), 2);
        assert!(steps["ipam"].as_u64().unwrap() < 2000);
        assert!(steps["veth"].as_u64().unwrap() >= 2000);
        assert_eq!(v["agent"]["attach_us"], 7);
    }
}
