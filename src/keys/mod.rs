//! Key management, in the order a key lives: its format and digest ([`format`]), what a
//! store keeps of it ([`record`]), the lifecycle operations on a store ([`manager`]), and
//! the HTTP API over them ([`api`], feature `axum`).

#[cfg(feature = "axum")]
pub(crate) mod api;
pub(crate) mod format;
pub(crate) mod manager;
pub(crate) mod record;
