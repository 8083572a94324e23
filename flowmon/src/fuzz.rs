//! The bodies of the cargo-fuzz targets (`flowmon/fuzz`), kept here so the
//! regression tests run every input that ever crashed through the very same
//! code. Each takes arbitrary bytes and must neither panic nor hang.

use std::io::Write as _;

use flowmon_common::{
    count::{Fixed, record, starts_new_connection},
    flow::FlowValue,
    parse::{ETH_P_IPV4, ETH_P_IPV6, Parsed, TcpSegment, parse_ethernet, parse_l3},
};

use crate::{close::Timeouts, filter::Expr, model::Conn};

/// The shared packet parser and counting routine, as the kernel runs them:
/// the input as an Ethernet frame, then as raw IPv4 and IPv6 (the offline
/// reader's other link types), each TCP result counted into one entry that
/// is then classified.
pub fn packet(data: &[u8]) {
    let mut value = FlowValue::default();
    let mut key = None;
    let mut seg = TcpSegment::default();
    let mut count = |parsed: Parsed, seg: &TcpSegment, now: u64| {
        if parsed != Parsed::Tcp {
            return;
        }
        assert!(seg.l3_offset as usize <= data.len(), "{seg:?}");
        if starts_new_connection(&value, seg) {
            value = FlowValue::default();
        }
        // Safety: `value` is a live local; nothing else touches it.
        unsafe { record(&mut value, seg, 1, u64::from(seg.ip_len), &Fixed(now)) };
        key.get_or_insert(seg.key);
    };
    count(parse_ethernet(data, 1, &mut seg), &seg, 1);
    for (n, ethertype) in [ETH_P_IPV4, ETH_P_IPV6].into_iter().enumerate() {
        let mut seg = TcpSegment::default();
        count(
            parse_l3(data, 0, ethertype, 1, 0, &mut seg),
            &seg,
            2 + n as u64,
        );
    }
    if let Some(k) = key {
        let conn = Conn::new(k, value);
        let _ = conn.classify(10_000_000_000, &Timeouts::default());
        let _ = (conn.history(), conn.conn_state());
    }
}

/// The pcap/pcapng reader and the offline model behind `flowmon analyze`.
pub fn capture(data: &[u8]) {
    let mut file = tempfile::NamedTempFile::new().expect("a temporary file");
    file.write_all(data).expect("writing the temporary file");
    if let Ok(a) = crate::offline::analyze(file.path(), &Timeouts::default()) {
        for r in &a.records {
            let _ = r.to_json();
        }
    }
}

/// The filter language: parsing, the error with its caret, and evaluation
/// against a connection row.
pub fn filter(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Expr::parse(text, crate::filter::CONN_FIELDS) {
        Ok(e) => {
            let _ = e.fields();
            let _ = e.matches(&sample_row());
        }
        Err(e) => {
            let _ = e.render(text);
        }
    }
}

fn sample_row() -> serde_json::Value {
    serde_json::json!({
        "client.ip": "10.0.0.2", "client.port": 40000, "server.ip": "10.0.0.1",
        "server.port": 80, "close": "rst", "closed_by": "server", "rst.count": 1,
        "fin.count": 0, "ct.count": 1, "syn.count": 1, "pkts.clt": 3, "duration": 0.5,
        "iface": "eth0", "history": "ShR", "conn_state": "RSTR",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_saved_input_runs_clean() {
        // Seeds and every input that once crashed a target, by target.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
        let mut ran = 0;
        for (target, f) in [
            ("packet", packet as fn(&[u8])),
            ("capture", capture),
            ("filter", filter),
        ] {
            for e in std::fs::read_dir(dir.join(target)).unwrap().flatten() {
                f(&std::fs::read(e.path()).unwrap());
                ran += 1;
            }
        }
        assert!(ran >= 3, "{ran} saved inputs");
    }
}
