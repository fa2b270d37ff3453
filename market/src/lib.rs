//! # hashgrid-market
//!
//! The order book and matching engine (issue 4), charges, and settlement state machines
//! (issue 8). Pure and deterministic: no tokio, no network, no clock of its own.
//!
//! Not built yet: this crate is a placeholder in the workspace so that the dependency
//! direction (node → market → protocol) is fixed from the start.

pub mod settlement;
