//! User-space extras for the shared types: aya::Pod and address conversions.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::flow::{Config, FAMILY_IPV4, FlowKey, FlowValue, TakeBatch};

// Safety: plain repr(C) structs of integers and byte arrays, padding fields
// explicit, so every bit pattern is valid and there are no hidden bytes.
unsafe impl aya::Pod for FlowKey {}
// Safety: as above.
unsafe impl aya::Pod for FlowValue {}
// Safety: as above.
unsafe impl aya::Pod for Config {}
// Safety: as above (`next` and `count` fill the 8 bytes before the
// 8-aligned slots).
unsafe impl aya::Pod for TakeBatch {}
// Safety: repr(C) plain data, every bit pattern valid, no padding bytes.
unsafe impl aya::Pod for crate::table::Bucket {}
// Safety: as above (the padding is an explicit field).
unsafe impl aya::Pod for crate::stats::CpuState {}
// Safety: as above (the padding is an explicit field).
unsafe impl aya::Pod for crate::table::Slot {}

impl FlowKey {
    fn ip(&self, raw: &[u8; 16]) -> IpAddr {
        if self.family == FAMILY_IPV4 {
            IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(*raw))
        }
    }

    /// Address of side A (the lower endpoint).
    pub fn ip_a(&self) -> IpAddr {
        self.ip(&self.addr_a)
    }

    /// Address of side B.
    pub fn ip_b(&self) -> IpAddr {
        self.ip(&self.addr_b)
    }
}

/// The 16-byte form of an address as the flow key stores it.
pub fn key_bytes(ip: IpAddr) -> (u8, [u8; 16]) {
    match ip {
        IpAddr::V4(v4) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            (FAMILY_IPV4, b)
        }
        IpAddr::V6(v6) => (crate::flow::FAMILY_IPV6, v6.octets()),
    }
}
