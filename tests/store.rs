//! Integration tests of the stash: one conformance suite run against every backend,
//! crash and concurrency tests with real child processes, corruption, dedup and the CLI.
mod store {
    pub(crate) mod cli;
    pub(crate) mod conformance;
    pub(crate) mod corruption;
    pub(crate) mod crash;
    pub(crate) mod model;
    pub(crate) mod servers;
}
