//! Small netlink verb helpers over rtnetlink, one file per object. Each
//! helper says which errnos count as success (EEXIST on add, ENODEV/ENOENT
//! on delete) so that callers can be idempotent where they mean to be.
//!
//! A [`Netlink`] is a current-thread tokio runtime plus an rtnetlink
//! connection opened in the namespace of the thread that creates it: create
//! it inside `netns::with_netns` for the pod, on the main thread for the
//! node.
pub mod addr;
pub mod link;
pub mod neigh;
pub mod route;

use std::future::Future;

use rtnetlink::Handle;
use tokio::runtime::{Builder, Runtime};

use crate::{Error, Result};

pub const EEXIST: i32 = libc::EEXIST;
pub const ENOENT: i32 = libc::ENOENT;
pub const ENODEV: i32 = libc::ENODEV;
pub const ESRCH: i32 = libc::ESRCH;

pub struct Netlink {
    rt: Runtime,
    handle: Handle,
}

impl Netlink {
    /// Opens a netlink socket in the calling thread's network namespace.
    pub fn open() -> Result<Self> {
        let rt = Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("tokio runtime: {e}")))?;
        // The socket registers with the runtime's reactor, so create it
        // inside the runtime's context.
        let (conn, handle, _) = {
            let _ctx = rt.enter();
            rtnetlink::new_connection()
                .map_err(|e| Error::Internal(format!("netlink socket: {e}")))?
        };
        // On a current-thread runtime this task is polled only while
        // `run` blocks on a request, which is exactly when it is needed.
        rt.spawn(conn);
        Ok(Self { rt, handle })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Runs one netlink conversation to completion.
    pub fn run<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}

pub use sluice_common::netlink::errno;

/// `Ok(true)` on success, `Ok(false)` when the kernel answered one of
/// `benign`, the error otherwise.
pub fn tolerate(
    r: std::result::Result<(), rtnetlink::Error>,
    benign: &[i32],
    op: impl FnOnce() -> String,
) -> Result<bool> {
    match r {
        Ok(()) => Ok(true),
        Err(e) if errno(&e).is_some_and(|n| benign.contains(&n)) => Ok(false),
        Err(e) => Err(Error::netlink(op(), e)),
    }
}
