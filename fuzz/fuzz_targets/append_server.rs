//! The part of `src/server` the `append` target includes: the storage role with what it uses,
//! and the backend trait with the in-memory backend (the storage engines stay out under
//! `cfg(fuzzing)`).

#[path = "../../src/server/backend/mod.rs"]
pub mod backend;
#[path = "../../src/server/content.rs"]
pub mod content;
#[path = "../../src/server/error.rs"]
pub mod error;
#[path = "../../src/server/limits.rs"]
pub mod limits;
#[path = "../../src/server/storage.rs"]
pub mod storage;
