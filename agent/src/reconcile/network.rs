//! Reaching the other nodes: routes to their pod CIDRs and `to_uplink` on
//! the interfaces those routes leave by (deferred Service egress to pods on
//! other nodes is judged there). Only what this agent added is removed.
use std::collections::BTreeSet;

use tracing::{error, info};

use super::{
    Reconciler,
    routes::{Route, Routes},
};
use crate::netdev;

pub struct Network {
    routes: Routes,
    /// Interfaces with `to_uplink` attached.
    uplinks: BTreeSet<String>,
}

impl Network {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            routes: Routes::new()?,
            uplinks: BTreeSet::new(),
        })
    }

    /// Routes as `desired`, then uplinks attached where they leave and
    /// detached where none leaves any more. Failures are logged and retried
    /// on the next call.
    pub async fn sync(&mut self, desired: &BTreeSet<Route>, reconciler: &Reconciler) {
        self.routes.sync(desired).await;
        let wanted: BTreeSet<String> = desired
            .iter()
            .filter_map(|(_, gw)| netdev::interface_towards(*gw))
            .collect();
        for ifname in wanted.difference(&self.uplinks.clone()) {
            let name = ifname.clone();
            match reconciler
                .with(move |st| Ok(st.dp.programs.attach_uplink(&name)?))
                .await
            {
                Ok(()) => {
                    info!(%ifname, "uplink attached");
                    self.uplinks.insert(ifname.clone());
                }
                Err(e) => error!(%ifname, error = %e, "attaching the uplink program failed"),
            }
        }
        for ifname in self.uplinks.clone().difference(&wanted) {
            let name = ifname.clone();
            match reconciler
                .with(move |st| Ok(st.dp.programs.detach_uplink(&name)?))
                .await
            {
                Ok(()) => {
                    info!(%ifname, "uplink detached");
                    self.uplinks.remove(ifname);
                }
                Err(e) => error!(%ifname, error = %e, "detaching the uplink program failed"),
            }
        }
    }
}
