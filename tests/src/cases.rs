//! Reachability-case format (work in progress).
