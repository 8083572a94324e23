//! `analyze` reads every link type and file format it claims, from real
//! captures: tcpdump on a veth (Ethernet) and on "any" (Linux cooked SLL and
//! SLL2), editcap's pcapng and raw-IP conversions of the Ethernet capture.
//! All five must give the same connections. Needs root (tcpdump in a
//! namespace); `cargo xtask test` runs it.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::Path,
    process::Command,
    thread,
};

use common::{Pair, sh};
use flowmon::{close::Timeouts, offline};

/// Records as JSON without the interface name (the one field the formats
/// legitimately differ in) and, with `times` false, without times: separate
/// tcpdump processes stamp the same packet microseconds apart.
fn records(path: &Path, times: bool) -> Vec<serde_json::Value> {
    let a = offline::analyze(path, &Timeouts::default())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let t = a.totals;
    assert_eq!(
        (t[3], t[2]),
        (0, 0),
        "{}: no malformed or non-TCP packets",
        path.display()
    );
    a.records
        .iter()
        .map(|r| {
            let mut j = r.to_json();
            let o = j.as_object_mut().unwrap();
            o.remove("iface");
            if !times {
                for k in ["first_seen", "last_seen", "duration"] {
                    o.remove(k);
                }
            }
            j
        })
        .collect()
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn every_link_type_and_format_gives_the_same_connections() {
    let pair = Pair::new();
    let eth = pair.capture();
    let sll = pair.capture_on("any", Some("LINUX_SLL"), "sll");
    let sll2 = pair.capture_on("any", Some("LINUX_SLL2"), "sll2");
    for srv in [pair.srv_v4, pair.srv_v6] {
        let l = Pair::in_ns(&pair.srv_ns, move || {
            TcpListener::bind((srv, 8081)).unwrap()
        });
        let server = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 5];
            s.read_exact(&mut b).unwrap();
            s.write_all(b"world").unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).unwrap();
        });
        Pair::in_ns(&pair.clt_ns, move || {
            let mut c = TcpStream::connect((srv, 8081)).unwrap();
            c.write_all(b"hello").unwrap();
            let mut b = [0u8; 5];
            c.read_exact(&mut b).unwrap();
        });
        server.join().unwrap();
    }
    // Let the last ACKs reach the captures.
    thread::sleep(std::time::Duration::from_millis(200));
    let eth = eth.stop();
    let sll = sll.stop();
    let sll2 = sll2.stop();
    let ng = eth.with_extension("pcapng");
    let raw = eth.with_extension("raw.pcap");
    sh(&[
        "editcap",
        "-F",
        "pcapng",
        eth.to_str().unwrap(),
        ng.to_str().unwrap(),
    ]);
    sh(&[
        "editcap",
        "-C",
        "14",
        "-T",
        "rawip",
        eth.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let link = |p: &Path| {
        let out = Command::new("capinfos")
            .args(["-E", "-M"])
            .arg(p)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.contains("encapsulation"))
            .unwrap_or("")
            .to_string()
    };
    assert!(link(&sll).ends_with("linux-sll"), "{}", link(&sll));
    assert!(link(&sll2).ends_with("linux-sll2"), "{}", link(&sll2));
    assert!(link(&raw).ends_with("rawip"), "{}", link(&raw));
    let want = records(&eth, true);
    assert_eq!(want.len(), 2);
    for r in &want {
        assert_eq!(
            (
                r["close"].as_str(),
                r["conn_state"].as_str(),
                r["history"].as_str()
            ),
            (Some("fin"), Some("SF"), Some("ShADadFf")),
            "{r}"
        );
    }
    // Converted from the same capture: identical to the nanosecond.
    for same in [&ng, &raw] {
        assert_eq!(records(same, true), want, "{}", same.display());
    }
    let untimed = records(&eth, false);
    for other in [&sll, &sll2] {
        assert_eq!(records(other, false), untimed, "{}", other.display());
    }
    for f in [eth, sll, sll2, ng, raw] {
        let _ = std::fs::remove_file(f);
    }
}
