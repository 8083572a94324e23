//! Types and packet-counting code shared by the kernel programs and user space.
//!
//! Everything here is `no_std` and compiles for the bpf targets: the same parser
//! and the same counting routine run in the XDP/TC programs and in the offline
//! pcap path, so both give the same answer for the same packet.
#![no_std]
#![cfg_attr(
    target_arch = "bpf",
    expect(
        internal_features,
        reason = "atomic_xadd: the bpf target has no atomic RMW types"
    )
)]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]

pub mod count;
#[cfg(any(test, feature = "user"))]
pub mod craft;
pub mod flow;
pub mod parse;
pub mod stats;
pub mod table;

#[cfg(feature = "user")]
pub mod user;

#[cfg(any(test, feature = "user"))]
extern crate std;
