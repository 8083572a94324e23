use flowmon_common::flow::{DIR_A_TO_B, DIR_B_TO_A, FlowKey, FlowValue};

use super::*;

const S: u64 = 1_000_000_000;

/// Builds a connection from events `(client?, letter, time in s)`, where the
/// letters are the history letters (S H A D F R); the client is side B.
fn conn(events: &[(bool, char, u64)]) -> Conn {
    let key = FlowKey {
        port_a: 80,
        port_b: 40000,
        family: 4,
        ..Default::default()
    };
    let mut v = FlowValue::default();
    for (i, &(client, letter, secs)) in events.iter().enumerate() {
        let d = &mut v.dir[if client { DIR_B_TO_A } else { DIR_A_TO_B }];
        // Events in the same second keep their listed order.
        let t = secs * S + 1 + i as u64;
        d.packets += 1;
        if d.first_ns == 0 {
            d.first_ns = t;
        }
        d.last_ns = t;
        let first = |f: &mut u64| {
            if *f == 0 {
                *f = t;
            }
        };
        match letter {
            'S' => {
                d.syn += 1;
                first(&mut d.first_syn_ns);
            }
            'H' => {
                d.synack += 1;
                first(&mut d.first_synack_ns);
            }
            'A' => first(&mut d.first_ack_ns),
            'D' => {
                d.data_packets += 1;
                first(&mut d.first_data_ns);
            }
            'F' => {
                d.fin += 1;
                first(&mut d.first_fin_ns);
            }
            'R' => {
                d.rst += 1;
                first(&mut d.first_rst_ns);
            }
            _ => panic!("letter {letter}"),
        }
    }
    Conn::new(key, v)
}

fn class(c: &Conn, now_s: u64) -> (&'static str, &'static str) {
    let (k, by) = c.classify(now_s * S, &Timeouts::default());
    (k.as_str(), by.as_str())
}

const HANDSHAKE: [(bool, char, u64); 3] = [(true, 'S', 0), (false, 'H', 0), (true, 'A', 0)];

fn with(extra: &[(bool, char, u64)]) -> Conn {
    let mut e = HANDSHAKE.to_vec();
    e.extend_from_slice(extra);
    conn(&e)
}

#[test]
fn graceful_close_by_client() {
    let c = with(&[
        (true, 'D', 1),
        (false, 'D', 1),
        (true, 'F', 2),
        (false, 'F', 3),
    ]);
    assert_eq!(class(&c, 4), ("fin", "client"));
    assert_eq!(
        (c.ct_count(), c.conn_state(), c.history().as_str()),
        (1, "SF", "ShADdFf")
    );
}

#[test]
fn fin_then_rst_from_the_client() {
    let c = with(&[(false, 'D', 1), (true, 'F', 2), (true, 'R', 3)]);
    assert_eq!(class(&c, 4), ("fin-rst", "client"));
    assert_eq!(c.conn_state(), "RSTO");
}

#[test]
fn client_fin_server_rst() {
    let c = with(&[(true, 'F', 2), (false, 'R', 3)]);
    assert_eq!(class(&c, 4), ("fin-rst", "server"));
    assert_eq!(c.conn_state(), "RSTR");
}

#[test]
fn aborts() {
    let c = with(&[(true, 'R', 1)]);
    assert_eq!(
        (class(&c, 2), c.conn_state(), c.ct_count()),
        (("rst", "client"), "RSTO", 1)
    );
    let c = with(&[(false, 'R', 1)]);
    assert_eq!((class(&c, 2), c.conn_state()), (("rst", "server"), "RSTR"));
}

#[test]
fn refused() {
    let c = conn(&[(true, 'S', 0), (false, 'R', 0)]);
    assert_eq!(
        (
            class(&c, 1),
            c.conn_state(),
            c.ct_count(),
            c.history().as_str()
        ),
        (("refused", "server"), "REJ", 0, "Sr")
    );
}

#[test]
fn unanswered_after_the_syn_timeout() {
    let c = conn(&[(true, 'S', 0), (true, 'S', 1), (true, 'S', 3)]);
    assert_eq!(class(&c, 5), ("connecting", "none"));
    assert_eq!(class(&c, 14), ("unanswered", "none"));
    assert_eq!((c.conn_state(), c.ct_count()), ("S0", 0));
}

#[test]
fn syn_ack_never_acknowledged() {
    let c = conn(&[(true, 'S', 0), (false, 'H', 0)]);
    assert_eq!(class(&c, 1), ("connecting", "none"));
    assert_eq!(class(&c, 12), ("unanswered", "none"));
    assert_eq!(c.ct_count(), 0);
}

#[test]
fn half_closed_after_the_close_timeout() {
    let c = with(&[(false, 'D', 1), (true, 'F', 2)]);
    assert_eq!(class(&c, 10), ("open", "none"));
    assert_eq!(class(&c, 63), ("half-closed", "client"));
    assert_eq!(c.conn_state(), "S2");
    let c = with(&[(false, 'F', 2)]);
    assert_eq!(c.conn_state(), "S3");
}

#[test]
fn open_then_idle() {
    let c = with(&[(true, 'D', 1), (false, 'D', 1)]);
    assert_eq!(class(&c, 100), ("open", "none"));
    assert_eq!(class(&c, 302), ("idle", "none"));
    assert_eq!(c.conn_state(), "S1");
}

#[test]
fn rst_without_any_connection() {
    let c = conn(&[(true, 'R', 0)]);
    assert_eq!(
        (
            class(&c, 1),
            c.conn_state(),
            c.ct_count(),
            c.history().as_str()
        ),
        (("orphan-rst", "client"), "OTH", 0, "R")
    );
}

#[test]
fn syn_then_rst_from_the_client() {
    let c = conn(&[(true, 'S', 0), (true, 'R', 1)]);
    assert_eq!(
        (class(&c, 2), c.conn_state(), c.ct_count()),
        (("rst", "client"), "RSTOS0", 0)
    );
}

#[test]
fn syn_then_fin_without_reply() {
    let c = conn(&[
        (true, 'S', 0),
        (true, 'A', 0),
        (true, 'D', 1),
        (true, 'F', 2),
    ]);
    assert_eq!(c.conn_state(), "SH");
}

#[test]
fn midstream_connection_counts_as_established() {
    let c = conn(&[
        (false, 'D', 0),
        (true, 'A', 0),
        (true, 'D', 1),
        (false, 'F', 2),
        (true, 'F', 2),
    ]);
    assert!(c.direction_guessed);
    assert_eq!(
        (
            class(&c, 3),
            c.ct_count(),
            c.conn_state(),
            c.history().as_str()
        ),
        (("fin", "server"), 1, "SF", "^dADfF")
    );
}

#[test]
fn every_class_has_a_distinct_name() {
    let names: std::collections::HashSet<_> = Close::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(names.len(), Close::ALL.len());
}
