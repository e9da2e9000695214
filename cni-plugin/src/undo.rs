//! Undo list: a failed ADD rolls back everything it did, newest first.
use crate::Result;

type Step<'a> = (&'static str, Box<dyn FnOnce() -> Result<()> + 'a>);

/// Steps run in reverse order on drop unless [`Undo::commit`] was called.
#[derive(Default)]
pub struct Undo<'a> {
    steps: Vec<Step<'a>>,
}

impl<'a> Undo<'a> {
    pub fn new() -> Self {
        Self { steps: Vec::new() }
    }

    /// Registers how to undo the step about to be (or just) done. Register
    /// before a step whose failure may leave something behind.
    pub fn push(&mut self, what: &'static str, f: impl FnOnce() -> Result<()> + 'a) {
        self.steps.push((what, Box::new(f)));
    }

    /// ADD succeeded: keep everything.
    pub fn commit(mut self) {
        self.steps.clear();
    }

    /// Runs the steps now (also what drop does). Failures are logged to
    /// stderr: the error the runtime sees is the one that caused the
    /// rollback.
    pub fn rollback(&mut self) {
        while let Some((what, f)) = self.steps.pop() {
            if let Err(e) = f() {
                eprintln!("sluice: rollback: {what}: {e}");
            }
        }
    }
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        self.rollback();
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::Error;

    #[test]
    fn steps_run_newest_first_and_past_failures() {
        let log = RefCell::new(Vec::new());
        {
            let mut u = Undo::new();
            u.push("a", || {
                log.borrow_mut().push("a");
                Ok(())
            });
            u.push("b", || {
                log.borrow_mut().push("b");
                Err(Error::Internal("boom".into()))
            });
        }
        assert_eq!(*log.borrow(), ["b", "a"]);
    }

    #[test]
    fn commit_keeps_everything() {
        let log = RefCell::new(Vec::<&str>::new());
        let mut u = Undo::new();
        u.push("a", || {
            log.borrow_mut().push("a");
            Ok(())
        });
        u.commit();
        assert!(log.borrow().is_empty());
    }
}
