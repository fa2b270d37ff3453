//! # hashgrid-testnet
//!
//! Launches N real `hashgrid-node` processes across R regions on one machine, drives a workload
//! and writes a report (issue 9).
//!
//! Not built yet: this crate only holds its place in the workspace.
