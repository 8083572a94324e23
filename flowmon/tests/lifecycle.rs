//! The live agent under traffic: hundreds of real connections while it polls,
//! reports and removes finished ones. Every connection must be reported
//! exactly once, with the right class, and with exactly the packets the wire
//! carried: nothing lost or doubled across read-and-remove. Needs root.

mod common;

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use common::{Pair, both_ways, bound_socket, set_linger_zero};
use flowmon::{
    agent::{Agent, monotonic_ns},
    close::Timeouts,
    kernel::{Kernel, LoadOptions, XdpAttach},
    record::ConnRecord,
};
use flowmon_common::stats::{STAT_FLOWS_CREATED, STAT_INSERT_FAILED};

const CONNECTIONS: u16 = 1000;

/// What the traffic thread did on each client port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Graceful,
    Abort,
    Refused,
}

/// Connections made, by (client port, server port), in order: the kernel
/// reuses ephemeral ports, and a reused tuple is a new connection each time.
fn traffic(srv: IpAddr, port: u16) -> HashMap<(u16, u16), Vec<Kind>> {
    let mut done: HashMap<(u16, u16), Vec<Kind>> = HashMap::new();
    for i in 0..CONNECTIONS {
        let kind = match i % 10 {
            0 => Kind::Refused,
            1..=3 => Kind::Abort,
            _ => Kind::Graceful,
        };
        let target = if kind == Kind::Refused { 9 } else { port };
        let (sock, local) = bound_socket(srv);
        if kind == Kind::Refused {
            assert!(sock.connect(&SocketAddr::new(srv, target).into()).is_err());
        } else {
            sock.connect(&SocketAddr::new(srv, target).into()).unwrap();
            let mut c: TcpStream = sock.into();
            c.write_all(b"ping").unwrap();
            let mut b = [0u8; 4];
            c.read_exact(&mut b).unwrap();
            if kind == Kind::Abort {
                set_linger_zero(c.as_raw_fd());
            }
        }
        done.entry((local, target)).or_default().push(kind);
    }
    done
}

fn serve(l: TcpListener) {
    for s in l.incoming() {
        let Ok(mut s) = s else { return };
        thread::spawn(move || {
            let mut b = [0u8; 4];
            if s.read_exact(&mut b).is_ok() && &b == b"stop" {
                return;
            }
            let _ = s.write_all(b"pong");
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        });
    }
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn every_connection_reported_once_with_every_packet() {
    let pair = Pair::new();
    let capture = pair.capture();
    let srv = pair.srv_v4;
    let listener = Pair::in_ns(&pair.srv_ns, move || {
        TcpListener::bind((srv, 7000)).unwrap()
    });
    thread::spawn(move || serve(listener));
    let clt_ns = pair.clt_ns.clone();
    let clt_if = pair.clt_if.clone();
    let (records, kinds, totals) = Pair::in_ns(&clt_ns, move || {
        let mut k = Kernel::load(LoadOptions {
            max_flows: 65_536,
            ..LoadOptions::default()
        })
        .unwrap();
        k.attach(&clt_if, XdpAttach::Native, false).unwrap();
        let t = Timeouts {
            linger: Duration::from_millis(100),
            ..Timeouts::default()
        };
        let mut agent = Agent::new(k, t);
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        // Threads started here inherit the client namespace.
        let generator = thread::spawn(move || {
            let r = traffic(srv, 7000);
            d.store(true, Ordering::SeqCst);
            r
        });
        let names = HashMap::new();
        let mut records: Vec<ConnRecord> = Vec::new();
        let mut polls = 0;
        while !done.load(Ordering::SeqCst) {
            records.extend(agent.poll(monotonic_ns(), 0, &names, false).unwrap().closed);
            polls += 1;
            thread::sleep(Duration::from_millis(5));
        }
        let during = records.len();
        let kinds = generator.join().unwrap();
        // Let the last closes' linger pass with the agent still polling,
        // then report whatever is left.
        for _ in 0..20 {
            records.extend(agent.poll(monotonic_ns(), 0, &names, false).unwrap().closed);
            thread::sleep(Duration::from_millis(20));
        }
        records.extend(agent.poll(monotonic_ns(), 0, &names, true).unwrap().closed);
        assert!(
            polls > 10,
            "the agent polled while traffic ran ({polls} polls)"
        );
        assert!(
            during > 0,
            "connections were removed while traffic still ran"
        );
        let totals = agent.kernel.stats().unwrap();
        (records, kinds, totals)
    });
    let wire = capture.finish();
    assert_eq!(
        kinds.values().map(Vec::len).sum::<usize>(),
        CONNECTIONS as usize
    );
    let mut by_tuple: HashMap<(u16, u16), Vec<&ConnRecord>> = HashMap::new();
    for r in &records {
        by_tuple
            .entry((r.conn.client().1, r.conn.server().1))
            .or_default()
            .push(r);
    }
    for (tuple, kinds) in &kinds {
        let mut ours = by_tuple
            .remove(tuple)
            .unwrap_or_else(|| panic!("connection {tuple:?} never reported"));
        ours.sort_by(|a, b| a.first_seen.total_cmp(&b.first_seen));
        let classes: Vec<(&str, &str)> = ours
            .iter()
            .map(|r| (r.close.as_str(), r.closed_by.as_str()))
            .collect();
        let expected: Vec<(&str, &str)> = kinds
            .iter()
            .map(|k| match k {
                Kind::Graceful => ("fin", "client"),
                Kind::Abort => ("rst", "client"),
                Kind::Refused => ("refused", "server"),
            })
            .collect();
        assert_eq!(
            classes, expected,
            "{tuple:?}: one record per connection, in order"
        );
        // The wire merges a reused tuple's lifetimes; so do the sums here.
        let (cip, cport) = ours[0].conn.client();
        let (sip, sport) = ours[0].conn.server();
        let (up, down) = both_ways(&wire, (cip, cport), (sip, sport));
        let sum = |f: &dyn Fn(&ConnRecord) -> [u64; 5]| {
            ours.iter()
                .map(|r| f(r))
                .fold([0u64; 5], |a, b| std::array::from_fn(|i| a[i] + b[i]))
        };
        let c = sum(&|r| {
            let d = r.conn.clt();
            [d.packets, d.bytes, d.syn.into(), d.fin.into(), d.rst.into()]
        });
        let s = sum(&|r| {
            let d = r.conn.srv();
            [
                d.packets,
                d.bytes,
                d.synack.into(),
                d.fin.into(),
                d.rst.into(),
            ]
        });
        assert_eq!(
            c,
            [
                up.packets,
                up.bytes,
                up.syn.into(),
                up.fin.into(),
                up.rst.into()
            ],
            "{tuple:?} client side: packets, bytes, SYN, FIN, RST"
        );
        assert_eq!(
            s,
            [
                down.packets,
                down.bytes,
                down.synack.into(),
                down.fin.into(),
                down.rst.into()
            ],
            "{tuple:?} server side: packets, bytes, SYN-ACK, FIN, RST"
        );
    }
    assert!(
        by_tuple.is_empty(),
        "records for connections the test never made: {:?}",
        by_tuple.keys()
    );
    assert_eq!(
        records.len(),
        CONNECTIONS as usize,
        "every connection reported exactly once"
    );
    assert_eq!(totals[STAT_INSERT_FAILED as usize], 0);
    assert!(totals[STAT_FLOWS_CREATED as usize] <= u64::from(CONNECTIONS));
}

/// Connections that never close are reported and expired by timeout: a SYN
/// nobody answers, a half-close the server never completes, an idle
/// established connection. After their reports the table is empty.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn timeouts_report_and_expire_connections() {
    let pair = Pair::new();
    common::sh(&[
        "ip",
        "netns",
        "exec",
        &pair.srv_ns,
        "nft",
        "add table inet t; add chain inet t input { type filter hook input priority 0; policy accept; }; add rule inet t input tcp dport 19 drop",
    ]);
    let srv = pair.srv_v4;
    let listener = Pair::in_ns(&pair.srv_ns, move || {
        TcpListener::bind((srv, 7001)).unwrap()
    });
    // The server reads to EOF but never closes its side, and holds the sockets.
    let held = thread::spawn(move || {
        let mut socks = Vec::new();
        for _ in 0..2 {
            let (mut s, _) = listener.accept().unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b).unwrap();
            socks.push(s);
        }
        thread::sleep(Duration::from_secs(4));
        drop(socks);
    });
    let clt_if = pair.clt_if.clone();
    let records = Pair::in_ns(&pair.clt_ns, move || {
        let mut k = Kernel::load(LoadOptions {
            max_flows: 1024,
            ..LoadOptions::default()
        })
        .unwrap();
        k.attach(&clt_if, XdpAttach::Native, false).unwrap();
        let t = Timeouts {
            syn: Duration::from_millis(400),
            close: Duration::from_millis(800),
            idle: Duration::from_millis(1200),
            linger: Duration::from_millis(100),
        };
        let mut agent = Agent::new(k, t);
        // Half-closed: the client shuts its side down, the server never does.
        let mut half = TcpStream::connect((srv, 7001)).unwrap();
        half.write_all(b"half").unwrap();
        half.shutdown(std::net::Shutdown::Write).unwrap();
        // Idle: established, one exchange, then silence.
        let mut idle = TcpStream::connect((srv, 7001)).unwrap();
        idle.write_all(b"idle").unwrap();
        // Unanswered: one SYN, no retry within the test (SYN retries at 1 s).
        let syn = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        syn.set_nonblocking(true).unwrap();
        let _ = syn.connect(&SocketAddr::new(srv, 19).into());
        let mut syn = Some(syn);
        let names = HashMap::new();
        let mut records: Vec<ConnRecord> = Vec::new();
        for _ in 0..60 {
            records.extend(agent.poll(monotonic_ns(), 0, &names, false).unwrap().closed);
            // Closing the connecting socket stops its SYN retransmissions,
            // which would otherwise start a new entry after the report.
            if records.iter().any(|r| r.conn.server().1 == 19) {
                syn = None;
            }
            if records.len() >= 3 {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        assert!(
            agent.kernel.flows().unwrap().is_empty(),
            "expired connections leave the table"
        );
        drop((half, idle, syn));

        records
    });
    held.join().unwrap();
    let mut classes: Vec<(u16, &str, &str, &str)> = records
        .iter()
        .map(|r| {
            (
                r.conn.server().1,
                r.close.as_str(),
                r.closed_by.as_str(),
                r.conn_state(),
            )
        })
        .collect();
    classes.sort();
    // Ports 7001 twice (half-closed, idle) and 19.
    assert_eq!(classes.len(), 3, "{classes:?}");
    assert_eq!(classes[0], (19, "unanswered", "none", "S0"));
    let rest: Vec<_> = classes[1..].iter().map(|c| (c.1, c.2, c.3)).collect();
    assert!(rest.contains(&("half-closed", "client", "S2")), "{rest:?}");
    assert!(rest.contains(&("idle", "none", "S1")), "{rest:?}");
}
