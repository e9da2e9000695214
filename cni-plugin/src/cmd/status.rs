//! STATUS: ready when the agent says so.
use sluice_proto::{Request, Response};

use crate::agent::Agent;
use crate::config::NetConf;
use crate::{Error, Result};

pub fn status(conf: &NetConf) -> Result<()> {
    let agent = Agent::new(&conf.agent_socket, conf.agent_timeout);
    match agent.call(&Request::Status) {
        Ok(Response::Error { msg, details, .. }) => {
            Err(Error::NotAvailable(if details.is_empty() {
                msg
            } else {
                format!("{msg}: {details}")
            }))
        }
        // Any other answer means "I am here and ready"; written without
        // listing variants so that protocol additions do not break us.
        Ok(_) => Ok(()),
        Err(e) => Err(Error::NotAvailable(chain(&e))),
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
