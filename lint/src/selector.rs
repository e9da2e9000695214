//! Label selectors: `sluice_api::selector`, shared with the agent's compiler
//! (the same parsing and validation, and `covers` for the shadowing rules).
pub use sluice_api::selector::{Labels, Selector};
