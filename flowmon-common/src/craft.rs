//! Builds test frames: Ethernet, VLAN tags, IPv4 with options, IPv6 with
//! extension headers, TCP with options. Used by the parser's unit tests and by
//! the kernel tests that feed frames to `BPF_PROG_TEST_RUN`.

use std::{net::IpAddr, vec::Vec};

use crate::parse::{ETH_P_IPV4, ETH_P_IPV6};

/// An IPv6 extension header to put between the fixed header and TCP.
#[derive(Clone, Debug)]
pub enum Ext {
    HopByHop,
    Routing,
    DestOpts,
    /// Fragment header with this offset (in 8-byte units) and more-fragments bit.
    Fragment {
        offset: u16,
        more: bool,
    },
}

impl Ext {
    /// A chain of every kind: hop-by-hop, destination options, routing, an
    /// atomic fragment header and destination options again, 16 + 16 + 16 + 8
    /// + 16 bytes.
    pub fn every_kind() -> Vec<Ext> {
        std::vec![
            Ext::HopByHop,
            Ext::DestOpts,
            Ext::Routing,
            Ext::Fragment {
                offset: 0,
                more: false
            },
            Ext::DestOpts
        ]
    }
}

/// A frame description; `build` lays it out as bytes.
#[derive(Clone, Debug)]
pub struct Frame {
    /// Wrap the frame in a Cisco FabricPath header.
    pub fabricpath: bool,
    /// VLAN tags, outermost first: (TPID, VLAN id).
    pub vlans: Vec<(u16, u16)>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    pub payload_len: usize,
    /// IPv4 option bytes (padded to a multiple of 4).
    pub ipv4_options: usize,
    /// IPv4 fragment offset (8-byte units) and more-fragments bit.
    pub ipv4_frag: (u16, bool),
    pub ipv6_ext: Vec<Ext>,
    /// IP protocol (6 for TCP).
    pub proto: u8,
    /// TCP option bytes (multiple of 4).
    pub tcp_options: usize,
}

impl Frame {
    /// A TCP segment with no tags, options or extension headers.
    pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Self {
        Self {
            fabricpath: false,
            vlans: Vec::new(),
            src,
            dst,
            sport,
            dport,
            flags,
            payload_len: 0,
            ipv4_options: 0,
            ipv4_frag: (0, false),
            ipv6_ext: Vec::new(),
            proto: 6,
            tcp_options: 0,
        }
    }

    pub fn payload(mut self, n: usize) -> Self {
        self.payload_len = n;
        self
    }

    pub fn vlan(mut self, tpid: u16, id: u16) -> Self {
        self.vlans.push((tpid, id));
        self
    }

    /// Lays the frame out. Ethernet addresses are fixed; checksums are left 0
    /// (neither the programs nor the parser check them).
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::new();
        if self.fabricpath {
            f.extend_from_slice(&[0x03, 0, 0, 0, 0, 0x09, 0x03, 0, 0, 0, 0, 0x08]);
            f.extend_from_slice(&crate::parse::ETH_P_FABRICPATH.to_be_bytes());
            f.extend_from_slice(&[0x00, 0x3f]);
        }
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01]);
        for (tpid, id) in &self.vlans {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
        }
        let l4 = self.l4();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
                let ihl = 20 + self.ipv4_options;
                let total = (ihl + l4.len()) as u16;
                let frag = (self.ipv4_frag.0 & 0x1fff) | if self.ipv4_frag.1 { 0x2000 } else { 0 };
                f.push(0x40 | (ihl / 4) as u8);
                f.push(0);
                f.extend_from_slice(&total.to_be_bytes());
                f.extend_from_slice(&[0x12, 0x34]);
                f.extend_from_slice(&frag.to_be_bytes());
                f.extend_from_slice(&[64, self.proto, 0, 0]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                // NOP options, then end-of-list.
                for i in 0..self.ipv4_options {
                    f.push(if i + 1 == self.ipv4_options { 0 } else { 1 });
                }
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                let mut ext = Vec::new();
                let kinds: Vec<u8> = self
                    .ipv6_ext
                    .iter()
                    .map(|e| match e {
                        Ext::HopByHop => 0,
                        Ext::Routing => 43,
                        Ext::DestOpts => 60,
                        Ext::Fragment { .. } => 44,
                    })
                    .collect();
                for (i, e) in self.ipv6_ext.iter().enumerate() {
                    let next = kinds.get(i + 1).copied().unwrap_or(self.proto);
                    match e {
                        Ext::Fragment { offset, more } => {
                            let fo = (offset << 3) | u16::from(*more);
                            ext.extend_from_slice(&[next, 0]);
                            ext.extend_from_slice(&fo.to_be_bytes());
                            ext.extend_from_slice(&[0, 0, 0, 1]);
                        }
                        // 16 bytes: length field 1 means (1 + 1) * 8.
                        _ => {
                            ext.extend_from_slice(&[next, 1]);
                            ext.extend_from_slice(&[1, 12]);
                            ext.extend_from_slice(&[0; 12]);
                        }
                    }
                }
                let first = kinds.first().copied().unwrap_or(self.proto);
                let plen = (ext.len() + l4.len()) as u16;
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&plen.to_be_bytes());
                f.extend_from_slice(&[first, 64]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                f.extend_from_slice(&ext);
            }
            _ => panic!("source and destination must be of one family"),
        }
        f.extend_from_slice(&l4);
        f
    }

    fn l4(&self) -> Vec<u8> {
        let mut t = Vec::new();
        if self.proto != 6 {
            t.extend_from_slice(&[0; 8]);
            t.extend(core::iter::repeat_n(0xab, self.payload_len));
            return t;
        }
        let doff = (20 + self.tcp_options) / 4;
        t.extend_from_slice(&self.sport.to_be_bytes());
        t.extend_from_slice(&self.dport.to_be_bytes());
        t.extend_from_slice(&1000u32.to_be_bytes());
        t.extend_from_slice(&2000u32.to_be_bytes());
        t.push((doff as u8) << 4);
        t.push(self.flags);
        t.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
        t.extend(core::iter::repeat_n(1, self.tcp_options));
        t.extend(core::iter::repeat_n(0xab, self.payload_len));
        t
    }
}
