//! The NetworkPolicy compiler (work in progress).
