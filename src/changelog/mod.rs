//! The change-log format: the universal, platform-independent description of what changed
//! in a user's tree. Pure: no I/O beyond byte slices.
//!
//! `model` is the data model every part shares.

pub mod model;

pub use model::*;
