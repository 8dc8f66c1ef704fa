//! The integration tests, one binary: real servers on loopback, real files, a real
//! `redis-server`. (`tests/no_secrets.rs` stays a binary of its own: it captures log lines,
//! and other tests' log statements must not race its subscriber.)

mod support;

mod admin_api;
mod admin_page;
mod cached_store;
mod file_store;
mod gateway;
mod inbound;
mod inject;
mod jwt;
mod last_used;
mod lifecycle;
mod limits;
mod model;
mod proxy;
mod realtime;
mod redis;
mod redis_limits;
mod refresh;
mod servers;
mod tokens;
mod upstream;
