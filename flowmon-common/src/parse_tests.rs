use std::{net::IpAddr, vec, vec::Vec};

use super::*;
use crate::{
    count::{Fixed, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, record},
    craft::{Ext, Frame},
    flow::{DIR_A_TO_B, DIR_B_TO_A, FlowValue},
};

fn v4(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn syn4() -> Frame {
    Frame::tcp(v4("10.0.0.2"), 40000, v4("10.0.0.1"), 80, TCP_SYN)
}

fn syn6() -> Frame {
    Frame::tcp(v4("fd00::2"), 40000, v4("fd00::1"), 443, TCP_SYN)
}

/// Parses a frame with a fresh segment, as every packet gets in the kernel.
fn parse(f: &[u8], ifindex: u32) -> Parsed {
    parse_ethernet(f, ifindex, &mut TcpSegment::default())
}

fn tcp(f: &[u8], ifindex: u32) -> TcpSegment {
    let mut seg = TcpSegment::default();
    match parse_ethernet(f, ifindex, &mut seg) {
        Parsed::Tcp => seg,
        other => panic!("expected a TCP segment, got {other:?}"),
    }
}

#[test]
fn ipv4_plain_syn() {
    let f = syn4().build();
    let s = tcp(&f[..], 7);
    assert_eq!(s.key.family, FAMILY_IPV4);
    assert_eq!(&s.key.addr_a[..4], &[10, 0, 0, 1]);
    assert_eq!(s.key.port_a, 80);
    assert_eq!(&s.key.addr_b[..4], &[10, 0, 0, 2]);
    assert_eq!(s.key.port_b, 40000);
    assert_eq!(s.key.ifindex, 7);
    assert_eq!(s.dir as usize, DIR_B_TO_A);
    assert_eq!(s.flags, u32::from(TCP_SYN));
    assert_eq!(
        (s.l3_offset, s.ip_len, s.hdr_len, s.payload_len),
        (14, 40, 40, 0)
    );
}

#[test]
fn both_directions_share_one_key() {
    let a = tcp(&syn4().build()[..], 1);
    let back = Frame::tcp(v4("10.0.0.1"), 80, v4("10.0.0.2"), 40000, TCP_SYN | TCP_ACK).build();
    let b = tcp(&back[..], 1);
    assert_eq!(a.key, b.key);
    assert_ne!(a.dir, b.dir);
    assert_eq!(b.dir as usize, DIR_A_TO_B);
}

#[test]
fn same_address_orders_by_port() {
    let f = Frame::tcp(v4("127.0.0.1"), 5000, v4("127.0.0.1"), 80, TCP_SYN).build();
    let s = tcp(&f[..], 1);
    assert_eq!(
        (s.key.port_a, s.key.port_b, s.dir as usize),
        (80, 5000, DIR_B_TO_A)
    );
}

#[test]
fn ipv4_options_and_payload() {
    let mut fr = syn4().payload(100);
    fr.ipv4_options = 12;
    fr.tcp_options = 12;
    let s = tcp(&fr.build()[..], 1);
    assert_eq!(
        (s.ip_len, s.hdr_len, s.payload_len),
        (32 + 32 + 100, 64, 100)
    );
}

#[test]
fn ethernet_padding_is_not_payload() {
    let mut f = syn4().build();
    f.extend_from_slice(&[0; 6]); // 60-byte minimum frame
    let s = tcp(&f[..], 1);
    assert_eq!((s.ip_len, s.payload_len), (40, 0));
}

#[test]
fn vlan_and_qinq() {
    let s = tcp(&syn4().vlan(ETH_P_8021Q, 42).build()[..], 1);
    assert_eq!((s.key.vlan, s.l3_offset), (42, 18));
    let qinq = syn6()
        .vlan(ETH_P_8021AD, 100)
        .vlan(ETH_P_8021Q, 200)
        .build();
    let s = tcp(&qinq[..], 1);
    assert_eq!(
        (s.key.vlan, s.l3_offset, s.key.family),
        (100, 22, FAMILY_IPV6)
    );
    let old = syn4().vlan(ETH_P_QINQ_9100, 5).vlan(ETH_P_8021Q, 6).build();
    assert_eq!(tcp(&old[..], 1).key.vlan, 5);
}

#[test]
fn fabricpath_encapsulation() {
    let mut fr = syn4().vlan(ETH_P_8021Q, 7);
    fr.fabricpath = true;
    let s = tcp(&fr.build()[..], 1);
    assert_eq!((s.l3_offset, s.key.vlan, s.key.port_a), (34, 7, 80));
    let f = fr.build();
    for cut in 14..34 {
        assert_eq!(parse(&f[..cut], 1), Parsed::Malformed, "cut at {cut}");
    }
}

#[test]
fn three_vlan_tags_are_not_followed() {
    let f = syn4()
        .vlan(ETH_P_8021AD, 1)
        .vlan(ETH_P_8021Q, 2)
        .vlan(ETH_P_8021Q, 3)
        .build();
    assert_eq!(parse(&f[..], 1), Parsed::NotTcp);
}

#[test]
fn ipv6_plain_and_each_extension_header() {
    let s = tcp(&syn6().build()[..], 1);
    assert_eq!((s.ip_len, s.hdr_len), (60, 60));
    for ext in [
        Ext::HopByHop,
        Ext::Routing,
        Ext::DestOpts,
        Ext::Fragment {
            offset: 0,
            more: true,
        },
    ] {
        let mut fr = syn6().payload(10);
        let extra = if matches!(ext, Ext::Fragment { .. }) {
            8
        } else {
            16
        };
        fr.ipv6_ext = vec![ext.clone()];
        let s = tcp(&fr.build()[..], 1);
        assert_eq!(
            (s.hdr_len, s.payload_len, s.ip_len),
            (60 + extra, 10, 70 + extra),
            "{ext:?}"
        );
    }
    let mut fr = syn6();
    fr.ipv6_ext = Ext::every_kind();
    assert_eq!(tcp(&fr.build()[..], 1).hdr_len, 40 + 16 * 4 + 8 + 20);
}

#[test]
fn ipv6_chain_longer_than_the_bound_is_malformed() {
    let mut fr = syn6();
    fr.ipv6_ext = vec![Ext::DestOpts; MAX_IPV6_EXT_HEADERS + 1];
    assert_eq!(parse(&fr.build()[..], 1), Parsed::Malformed);
    fr.ipv6_ext = vec![Ext::DestOpts; MAX_IPV6_EXT_HEADERS];
    assert!(parse(&fr.build()[..], 1) == Parsed::Tcp);
}

#[test]
fn fragments() {
    let mut fr = syn4().payload(8);
    fr.ipv4_frag = (0, true);
    assert!(
        parse(&fr.build()[..], 1) == Parsed::Tcp,
        "first fragment has the header"
    );
    fr.ipv4_frag = (185, false);
    assert_eq!(parse(&fr.build()[..], 1), Parsed::Fragment);
    let mut fr = syn6();
    fr.ipv6_ext = vec![Ext::Fragment {
        offset: 100,
        more: false,
    }];
    assert_eq!(parse(&fr.build()[..], 1), Parsed::Fragment);
}

#[test]
fn non_tcp() {
    let mut fr = syn4();
    fr.proto = 17;
    assert_eq!(parse(&fr.build()[..], 1), Parsed::NotTcp);
    let mut fr = syn6();
    fr.proto = 58;
    assert_eq!(parse(&fr.build()[..], 1), Parsed::NotTcp);
    let mut arp = syn4().build();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(parse(&arp[..], 1), Parsed::NotTcp);
}

/// Cutting a frame anywhere inside its headers must give Malformed, never a
/// segment and never a panic.
#[test]
fn truncation_at_every_layer() {
    let mut v4o = syn4().vlan(ETH_P_8021Q, 3);
    v4o.ipv4_options = 8;
    v4o.tcp_options = 12;
    let mut v6e = syn6().vlan(ETH_P_8021AD, 3).vlan(ETH_P_8021Q, 4);
    v6e.ipv6_ext = vec![
        Ext::HopByHop,
        Ext::Fragment {
            offset: 0,
            more: true,
        },
    ];
    v6e.tcp_options = 8;
    for fr in [syn4(), syn6(), v4o, v6e] {
        let full = fr.build();
        assert!(parse(&full[..], 1) == Parsed::Tcp);
        for cut in 0..full.len() {
            assert_eq!(
                parse(&full[..cut], 1),
                Parsed::Malformed,
                "cut at {cut} of {fr:?}"
            );
        }
    }
}

#[test]
fn invalid_header_fields() {
    let mut f = syn4().build();
    f[14] = 0x65; // version 6 in an IPv4 ethertype
    assert_eq!(parse(&f[..], 1), Parsed::Malformed);
    let mut f = syn4().build();
    f[14] = 0x44; // IHL 4
    assert_eq!(parse(&f[..], 1), Parsed::Malformed);
    let mut f = syn4().build();
    f[16..18].copy_from_slice(&10u16.to_be_bytes()); // total length < IHL
    assert_eq!(parse(&f[..], 1), Parsed::Malformed);
    let mut f = syn4().build();
    f[14 + 20 + 12] = 0x40; // TCP data offset 4
    assert_eq!(parse(&f[..], 1), Parsed::Malformed);
    let mut f = syn4().build();
    f[14 + 20 + 12] = 0xf0; // data offset past the segment
    assert_eq!(parse(&f[..], 1), Parsed::Malformed);
}

fn count(frames: &[Vec<u8>]) -> (crate::flow::FlowKey, FlowValue) {
    let mut v = FlowValue::default();
    let mut key = None;
    for (i, f) in frames.iter().enumerate() {
        let s = tcp(&f[..], 1);
        assert_eq!(*key.get_or_insert(s.key), s.key);
        // Safety: `v` is a live local.
        unsafe { record(&mut v, &s, 1, u64::from(s.ip_len), &Fixed(1000 + i as u64)) };
    }
    (key.unwrap(), v)
}

#[test]
fn counting_a_whole_connection() {
    let c = v4("192.0.2.9");
    let s = v4("192.0.2.1");
    let pkt = |from_client: bool, flags: u8, payload: usize| {
        if from_client {
            Frame::tcp(c, 5555, s, 22, flags).payload(payload).build()
        } else {
            Frame::tcp(s, 22, c, 5555, flags).payload(payload).build()
        }
    };
    let frames: Vec<Vec<u8>> = vec![
        pkt(true, TCP_SYN, 0),
        pkt(false, TCP_SYN | TCP_ACK, 0),
        pkt(true, TCP_ACK, 0),
        pkt(true, TCP_ACK, 50),
        pkt(false, TCP_ACK, 500),
        pkt(true, TCP_FIN | TCP_ACK, 0),
        pkt(false, TCP_FIN | TCP_ACK, 0),
        pkt(true, TCP_ACK, 0),
        pkt(true, TCP_RST, 0),
    ];
    let (key, v) = count(&frames);
    assert_eq!(key.port_a, 22);
    let srv = v.dir[DIR_A_TO_B];
    let clt = v.dir[DIR_B_TO_A];
    assert_eq!(
        (
            clt.packets,
            clt.syn,
            clt.synack,
            clt.fin,
            clt.rst,
            clt.data_packets
        ),
        (6, 1, 0, 1, 1, 1)
    );
    assert_eq!(
        (
            srv.packets,
            srv.syn,
            srv.synack,
            srv.fin,
            srv.rst,
            srv.data_packets
        ),
        (3, 0, 1, 1, 0, 1)
    );
    assert_eq!(clt.bytes, 6 * 40 + 50);
    assert_eq!(srv.bytes, 3 * 40 + 500);
    assert_eq!((clt.first_ns, clt.last_ns), (1000, 1008));
    assert_eq!(
        (
            clt.first_syn_ns,
            clt.first_ack_ns,
            clt.first_data_ns,
            clt.first_fin_ns,
            clt.first_rst_ns
        ),
        (1000, 1002, 1003, 1005, 1008)
    );
    assert_eq!(
        (
            srv.first_synack_ns,
            srv.first_data_ns,
            srv.first_fin_ns,
            srv.first_rst_ns,
            srv.first_ack_ns
        ),
        (1001, 1004, 1006, 0, 0)
    );
}

#[test]
fn merging_two_counts_of_one_connection() {
    let mut a = FlowValue::default();
    let mut b = FlowValue::default();
    (
        a.dir[0].packets,
        a.dir[0].first_ns,
        a.dir[0].last_ns,
        a.dir[0].first_syn_ns,
        a.dir[0].syn,
    ) = (3, 10, 30, 10, 1);
    (
        b.dir[0].packets,
        b.dir[0].first_ns,
        b.dir[0].last_ns,
        b.dir[0].first_fin_ns,
        b.dir[0].fin,
    ) = (2, 40, 50, 50, 1);
    (b.dir[1].packets, b.dir[1].first_ns, b.dir[1].last_ns) = (1, 45, 45);
    a.merge(&b);
    let d = a.dir[0];
    assert_eq!(
        (
            d.packets,
            d.first_ns,
            d.last_ns,
            d.first_syn_ns,
            d.first_fin_ns,
            d.syn,
            d.fin
        ),
        (5, 10, 50, 10, 50, 1, 1)
    );
    assert_eq!(
        (a.dir[1].packets, a.dir[1].first_ns, a.dir[1].last_ns),
        (1, 45, 45)
    );
}

/// A clock whose exact and coarse readings differ, so a test can see which
/// one each packet took.
struct TwoClocks {
    precise: u64,
    coarse: u64,
}

impl crate::count::Clock for TwoClocks {
    fn event(&self, _latest: u64) -> u64 {
        self.precise
    }
    fn coarse(&self) -> u64 {
        self.coarse
    }
}

#[test]
fn routine_packets_take_the_coarse_time_and_never_move_last_back() {
    let c = v4("192.0.2.9");
    let s = v4("192.0.2.1");
    let mut v = FlowValue::default();
    // (from client, flags, payload, exact time, coarse time, expected last_ns)
    let steps: [(bool, u8, usize, u64, u64, u64); 9] = [
        (true, TCP_SYN, 0, 100, 96, 100),
        // A retransmitted SYN still sets nothing new but carries a flag.
        (true, TCP_SYN, 0, 110, 108, 110),
        (true, TCP_ACK, 0, 120, 116, 120),  // first pure ACK: exact
        (true, TCP_ACK, 10, 130, 128, 130), // first data: exact
        (true, TCP_ACK, 10, 140, 136, 136), // routine: coarse
        (true, TCP_ACK, 0, 150, 132, 136),  // coarse behind last: kept
        (true, TCP_ACK, 10, 160, 156, 156), // routine: coarse
        (true, TCP_FIN | TCP_ACK, 0, 170, 168, 170),
        // After its own FIN a side's packets end the connection: exact.
        (true, TCP_ACK, 0, 180, 176, 180),
    ];
    for (i, &(from_client, flags, payload, precise, coarse, last)) in steps.iter().enumerate() {
        let f = if from_client {
            Frame::tcp(c, 5555, s, 22, flags).payload(payload).build()
        } else {
            Frame::tcp(s, 22, c, 5555, flags).payload(payload).build()
        };
        let seg = tcp(&f[..], 1);
        let clock = TwoClocks { precise, coarse };
        // Safety: `v` is a live local.
        unsafe { record(&mut v, &seg, 1, u64::from(seg.ip_len), &clock) };
        assert_eq!(v.dir[DIR_B_TO_A].last_ns, last, "step {i}");
    }
    let clt = v.dir[DIR_B_TO_A];
    assert_eq!(
        (
            clt.packets,
            clt.syn,
            clt.fin,
            clt.data_packets,
            clt.first_ns,
            clt.first_syn_ns,
            clt.first_ack_ns,
            clt.first_data_ns,
            clt.first_fin_ns
        ),
        (9, 2, 1, 3, 100, 100, 120, 130, 170)
    );
}

#[test]
fn a_coarse_clock_keeps_events_in_order_within_a_tick() {
    use crate::count::ordered;
    // A reading after everything the connection holds is taken as it is;
    // one that is not (the same tick, or a tick read late) goes 1 ns past.
    assert_eq!(ordered(5_000, 3_000), 5_000);
    assert_eq!(ordered(5_000, 5_000), 5_001);
    assert_eq!(ordered(4_000, 9_000), 9_001);
    assert_eq!(ordered(4_000, 0), 4_000);
}
