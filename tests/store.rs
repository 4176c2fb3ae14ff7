//! Integration tests of the stash: one conformance suite run against every backend,
//! crash and concurrency tests with real child processes, corruption, dedup, the CLI, and
//! mirrored stashes (redundancy).
mod store {
    pub(crate) mod cli;
    pub(crate) mod conformance;
    pub(crate) mod corruption;
    pub(crate) mod crash;
    pub(crate) mod mirror;
    pub(crate) mod model;
    pub(crate) mod servers;
}
