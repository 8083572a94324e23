//! flowmon: a kernel-accelerated TCP session-health monitor.
//!
//! The library holds everything the `flowmon` binary does, so tests can drive
//! it directly: [`kernel`] loads and reads the eBPF programs, [`model`] turns
//! raw per-connection counters into client/server views, [`summary`] renders
//! what the agent prints.

pub mod agent;
pub mod aggregate;
pub mod api;
pub mod bpfsys;
pub mod caps;
pub mod capture;
pub mod close;
pub mod diagnose;
pub mod filter;
pub mod flowtable;
pub mod fuzz;
pub mod graph;
pub mod http;
pub mod iface;
pub mod interval;
pub mod ipfix;
pub mod kernel;
pub mod linger;
pub mod metrics;
pub mod model;
pub mod offline;
pub mod prefetch;
pub mod recent;
pub mod record;
pub mod render;
pub mod replay;
pub mod services;
pub mod sinks;
pub mod snapshot;
pub mod status;
pub mod store;
pub mod summary;
pub mod ticks;
pub mod views;
