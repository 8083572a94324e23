//! Header parsing from Ethernet down to TCP, shared by kernel and user space.
//!
//! The parser reads through [`PacketBytes`], which the XDP and TC programs
//! implement with bounds-checked packet pointers and user space implements over a
//! byte slice. Every loop is bounded and every offset is checked before use, as
//! the verifier demands. Lengths come from the IP and TCP headers, not from the
//! frame, so Ethernet padding and capture snap lengths do not change the counts.

use crate::flow::{Endpoints, FAMILY_IPV4, FAMILY_IPV6, FlowKey};

const _: () = assert!(core::mem::size_of::<TcpSegment>() == 68);

/// Bounded read access to a packet.
pub trait PacketBytes {
    /// A copy of the `T` that starts `offset` bytes into the packet, or `None`
    /// when the packet ends before it.
    fn load<T: Copy>(&self, offset: usize) -> Option<T>;
}

impl PacketBytes for [u8] {
    #[inline]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        let end = offset.checked_add(core::mem::size_of::<T>())?;
        if end > self.len() {
            return None;
        }
        // Safety: the range was checked above and T is Copy plain data read
        // unaligned from initialised bytes.
        Some(unsafe { self.as_ptr().add(offset).cast::<T>().read_unaligned() })
    }
}

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;
/// Pre-standard QinQ outer tag still emitted by some switches.
pub const ETH_P_QINQ_9100: u16 = 0x9100;
/// Cisco FabricPath: 16-byte outer header (MACs, this type, FTag/TTL), then
/// the original Ethernet frame. Mirror ports on FabricPath fabrics carry it.
pub const ETH_P_FABRICPATH: u16 = 0x8903;
const FABRICPATH_HLEN: usize = 16;

/// VLAN tags followed before giving up (802.1ad outer + 802.1Q inner).
pub const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers followed before counting the packet as malformed.
pub const MAX_IPV6_EXT_HEADERS: usize = 6;
/// Largest header offset the parser reads at. Bounds every variable offset for
/// the verifier; no legal header chain within the limits above reaches it.
pub const MAX_HEADER_OFFSET: usize = 2048;

const IPPROTO_TCP: u8 = 6;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;

/// A TCP segment found in a packet. The parser fills it in place (in the
/// kernel it lives in a per-CPU scratch map: the BPF stack is 512 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpSegment {
    pub key: FlowKey,
    /// Direction index into [`crate::flow::FlowValue::dir`].
    pub dir: u32,
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10, ...).
    pub flags: u32,
    /// Offset of the IP header from the start of the packet.
    pub l3_offset: u32,
    /// IP-layer length of the packet from its header (IPv4 total length,
    /// IPv6 40 + payload length).
    pub ip_len: u32,
    /// IP header, IPv6 extension headers and TCP header, in bytes.
    pub hdr_len: u32,
    /// TCP payload bytes.
    pub payload_len: u32,
}

/// What the parser made of a packet. Every kind is passed on by the programs;
/// only the counter it lands in differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A TCP segment, written to the `TcpSegment` passed in.
    Tcp,
    /// Well-formed, but not TCP over IP.
    NotTcp,
    /// A fragment other than the first: no TCP header to read.
    Fragment,
    /// Truncated or invalid at some layer.
    Malformed,
}

#[inline(always)]
fn be16<P: PacketBytes + ?Sized>(p: &P, off: usize) -> Option<u16> {
    p.load::<[u8; 2]>(off).map(u16::from_be_bytes)
}

/// Parses a frame that starts with an Ethernet header.
#[inline(always)]
pub fn parse_ethernet<P: PacketBytes + ?Sized>(
    p: &P,
    ifindex: u32,
    seg: &mut TcpSegment,
) -> Parsed {
    let Some(mut ethertype) = be16(p, 12) else {
        return Parsed::Malformed;
    };
    // Untagged IPv4 first: most packets are, and it skips the tag checks.
    if ethertype == ETH_P_IPV4 {
        return parse_l3(p, ETH_HLEN, ethertype, ifindex, 0, seg);
    }
    let mut off = ETH_HLEN;
    if ethertype == ETH_P_FABRICPATH {
        let Some(inner) = be16(p, FABRICPATH_HLEN + 12) else {
            return Parsed::Malformed;
        };
        ethertype = inner;
        off = FABRICPATH_HLEN + ETH_HLEN;
    }
    let mut vlan = 0u16;
    let mut tags = 0;
    while tags < MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD && ethertype != ETH_P_QINQ_9100 {
            break;
        }
        let (Some(tci), Some(inner)) = (be16(p, off), be16(p, off + 2)) else {
            return Parsed::Malformed;
        };
        if tags == 0 {
            vlan = tci & 0x0fff;
        }
        ethertype = inner;
        off += 4;
        tags += 1;
    }
    parse_l3(p, off, ethertype, ifindex, vlan, seg)
}

/// Parses from the network header at `off`, whose type is `ethertype`. Used
/// directly for link types without an Ethernet header (raw IP, Linux SLL).
#[inline(always)]
pub fn parse_l3<P: PacketBytes + ?Sized>(
    p: &P,
    off: usize,
    ethertype: u16,
    ifindex: u32,
    vlan: u16,
    seg: &mut TcpSegment,
) -> Parsed {
    // Filled in as the layers are read: addresses and family by the IP
    // parsers, ports by parse_tcp.
    let ends = Endpoints {
        src: [0; 4],
        dst: [0; 4],
        sport: 0,
        dport: 0,
        ifindex,
        vlan,
        family: 0,
    };
    match ethertype {
        ETH_P_IPV4 => parse_ipv4(p, off, ends, seg),
        ETH_P_IPV6 => parse_ipv6(p, off, ends, seg),
        // A third VLAN tag lands here too: not followed, so not TCP to us.
        _ => Parsed::NotTcp,
    }
}

#[inline(always)]
fn parse_ipv4<P: PacketBytes + ?Sized>(
    p: &P,
    l3: usize,
    mut ends: Endpoints,
    seg: &mut TcpSegment,
) -> Parsed {
    // Whole words: the kernel build then loads the header in five reads, not
    // twenty byte reads shifted together.
    let Some(hdr) = p.load::<[u32; 5]>(l3) else {
        return Parsed::Malformed;
    };
    let b = |i: usize| hdr[i / 4].to_ne_bytes()[i % 4];
    if b(0) >> 4 != 4 {
        return Parsed::Malformed;
    }
    let ihl = ((b(0) & 0x0f) as usize) * 4;
    let total_len = u16::from_be_bytes([b(2), b(3)]) as usize;
    if ihl < 20 || total_len < ihl {
        return Parsed::Malformed;
    }
    // Options (IHL > 5) must be present in full; without options the load
    // above covered the header.
    if ihl > 20 && p.load::<u8>(l3 + ihl - 1).is_none() {
        return Parsed::Malformed;
    }
    let frag_offset = u16::from_be_bytes([b(6), b(7)]) & 0x1fff;
    if frag_offset != 0 {
        return Parsed::Fragment;
    }
    if b(9) != IPPROTO_TCP {
        return Parsed::NotTcp;
    }
    (ends.src[0], ends.dst[0], ends.family) = (hdr[3], hdr[4], FAMILY_IPV4);
    parse_tcp(p, l3, l3 + ihl, total_len - ihl, total_len, ends, seg)
}

#[inline(always)]
fn parse_ipv6<P: PacketBytes + ?Sized>(
    p: &P,
    l3: usize,
    mut ends: Endpoints,
    seg: &mut TcpSegment,
) -> Parsed {
    let Some(hdr) = p.load::<[u8; 8]>(l3) else {
        return Parsed::Malformed;
    };
    if hdr[0] >> 4 != 6 {
        return Parsed::Malformed;
    }
    let payload_len = u16::from_be_bytes([hdr[4], hdr[5]]) as usize;
    let mut next = hdr[6];
    let mut off = l3 + 40;
    let mut i = 0;
    while i < MAX_IPV6_EXT_HEADERS {
        if next == IPPROTO_TCP {
            break;
        }
        let Some(ext) = p.load::<[u8; 4]>(off) else {
            return Parsed::Malformed;
        };
        let len = match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => (ext[1] as usize + 1) * 8,
            IPV6_FRAGMENT => {
                if u16::from_be_bytes([ext[2], ext[3]]) & 0xfff8 != 0 {
                    return Parsed::Fragment;
                }
                8
            }
            IPV6_AH => (ext[1] as usize + 2) * 4,
            // UDP, ICMPv6, ESP, no-next-header, ...
            _ => return Parsed::NotTcp,
        };
        next = ext[0];
        off += len;
        if off > MAX_HEADER_OFFSET {
            return Parsed::Malformed;
        }
        i += 1;
    }
    if next != IPPROTO_TCP {
        return Parsed::Malformed;
    }
    let ext_len = off - (l3 + 40);
    if payload_len < ext_len {
        return Parsed::Malformed;
    }
    let Some(addrs) = p.load::<[u32; 8]>(l3 + 8) else {
        return Parsed::Malformed;
    };
    ends.src = [addrs[0], addrs[1], addrs[2], addrs[3]];
    ends.dst = [addrs[4], addrs[5], addrs[6], addrs[7]];
    ends.family = FAMILY_IPV6;
    let ip_len = 40 + payload_len;
    parse_tcp(p, l3, off, payload_len - ext_len, ip_len, ends, seg)
}

/// Finishes `seg` from the TCP header at `l4`, given the endpoints so far
/// (where the packet was seen, its addresses and family).
#[inline(always)]
fn parse_tcp<P: PacketBytes + ?Sized>(
    p: &P,
    l3: usize,
    l4: usize,
    l4_len: usize,
    ip_len: usize,
    mut ends: Endpoints,
    seg: &mut TcpSegment,
) -> Parsed {
    if l4 > MAX_HEADER_OFFSET {
        return Parsed::Malformed;
    }
    // The 20-byte header as words (see parse_ipv4).
    let Some(words) = p.load::<[u32; 5]>(l4) else {
        return Parsed::Malformed;
    };
    let tcp = |i: usize| words[i / 4].to_ne_bytes()[i % 4];
    let doff = ((tcp(12) >> 4) as usize) * 4;
    if doff < 20 || doff > l4_len {
        return Parsed::Malformed;
    }
    // The whole TCP header, options included, must be in the packet.
    if doff > 20 && p.load::<u8>(l4 + doff - 1).is_none() {
        return Parsed::Malformed;
    }
    ends.sport = u16::from_be_bytes([tcp(0), tcp(1)]);
    ends.dport = u16::from_be_bytes([tcp(2), tcp(3)]);
    seg.dir = seg.key.write_canonical(&ends) as u32;
    seg.flags = u32::from(tcp(13));
    seg.l3_offset = l3 as u32;
    seg.ip_len = ip_len as u32;
    seg.hdr_len = (l4 - l3 + doff) as u32;
    seg.payload_len = (l4_len - doff) as u32;
    Parsed::Tcp
}

#[cfg(test)]
#[path = "parse_tests.rs"]
mod tests;
