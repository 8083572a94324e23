//! History and exports from a live agent, checked by the real consumers:
//! promtool and a Prometheus server scraping the agent, tshark decoding the
//! IPFIX stream and nfcapd/nfdump collecting it, the history read back after
//! a restart and without an agent, snapshot files, and `flowmon graph`.
//! Every count is compared with tshark's reading of a capture on the veth.

mod common;

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use common::{
    Agent, Daemon, Mix, Pair, Wire, cflow_fields, flowmon, http_get, ipfix_capture, mixed_traffic,
    rows, sample, wait_for,
};
use serde_json::Value;

/// Percent-encodes a PromQL query for a URL.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Per side (client, server) sums of what crossed the wire.
fn sides(
    wire: &std::collections::HashMap<(IpAddr, u16, IpAddr, u16), Wire>,
    client: IpAddr,
) -> [Wire; 2] {
    let mut s = [Wire::default(); 2];
    for ((src, ..), w) in wire {
        let side = &mut s[usize::from(*src != client)];
        side.packets += w.packets;
        side.bytes += w.bytes;
        side.syn += w.syn;
        side.synack += w.synack;
        side.fin += w.fin;
        side.rst += w.rst;
    }
    s
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn history_snapshots_metrics_and_ipfix_from_a_live_agent() {
    let pair = Pair::new();
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let (db, snaps, sock) = (d("history.db"), d("snapshots"), d("api.sock"));
    std::fs::create_dir(d("nfcapd")).unwrap();

    // The collectors, on the client namespace's loopback.
    let ipfix_pcap = d("ipfix.pcap");
    let tcpdump = ipfix_capture(&pair.clt_ns, &ipfix_pcap);
    let nfcapd = Daemon::start(
        &pair.clt_ns,
        &[
            "nfcapd",
            "-b",
            "127.0.0.1",
            "-p",
            "4739",
            "-w",
            &d("nfcapd"),
            "-t",
            "3600",
        ],
        &dir.path().join("nfcapd.log"),
    );
    std::fs::write(
        d("prometheus.yml"),
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n  - job_name: flowmon\n    static_configs:\n      - targets: ['127.0.0.1:9475']\n",
    )
    .unwrap();
    let prometheus = Daemon::start(
        &pair.clt_ns,
        &[
            "prometheus",
            &format!("--config.file={}", d("prometheus.yml")),
            &format!("--storage.tsdb.path={}", d("tsdb")),
            "--web.listen-address=127.0.0.1:9090",
        ],
        &dir.path().join("prometheus.log"),
    );

    let agent = Agent::quick(
        &pair,
        &sock,
        &[
            "--db",
            &db,
            "--aggregate-interval",
            "1s",
            "--snapshot-dir",
            &snaps,
            "--metrics",
            "9475",
            "--ipfix",
            "udp://127.0.0.1:4739",
        ],
    );
    assert!(
        agent
            .banner
            .contains("metrics at http://127.0.0.1:9475/metrics"),
        "{}",
        agent.banner
    );

    let capture = pair.capture();
    let Mix {
        graceful,
        abort,
        refused,
    } = mixed_traffic(&pair, 8080);
    let mut classes = BTreeMap::new();
    for p in &graceful {
        classes.insert(*p, "fin");
    }
    classes.insert(abort, "rst");
    for p in &refused {
        classes.insert(*p, "refused");
    }
    let finished = |args: &[&str]| -> Vec<Value> {
        let mut a = args.to_vec();
        a.push("--json");
        rows(&flowmon(&a))
            .into_iter()
            .filter(|r| r["close"] != "open" && r["close"] != "connecting")
            .collect()
    };
    let by_port = |rows: &[Value]| -> BTreeMap<u16, String> {
        rows.iter()
            .map(|r| {
                (
                    r["client.port"].as_u64().unwrap() as u16,
                    r["close"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let want: BTreeMap<u16, String> = classes.iter().map(|(p, c)| (*p, c.to_string())).collect();
    wait_for(
        "the agent to report all five",
        Duration::from_secs(10),
        || {
            let f = finished(&["flows", "--socket", &sock, "--since", "1h"]);
            (by_port(&f) == want).then_some(())
        },
    );
    let wire = capture.finish();
    let [clt, srv] = sides(&wire, pair.clt_v4);
    // One more aggregate interval, so the closes are in a finished one.
    thread::sleep(Duration::from_millis(1500));

    // --- Prometheus: the page passes promtool, counts equal the wire's.
    let page = http_get(&pair.clt_ns, "127.0.0.1:9475", "/metrics".into()).expect("metrics page");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let lint = promtool.wait_with_output().unwrap();
    assert!(
        lint.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    let iface = &pair.clt_if;
    let closed = |class: &str| {
        sample(
            &page,
            &format!(r#"flowmon_connections_closed_total{{iface="{iface}",class="{class}"}}"#),
        )
    };
    assert_eq!(
        (closed("fin"), closed("rst"), closed("refused")),
        (Some(2.0), Some(1.0), Some(2.0))
    );
    let flag = |f: &str, side: &str| {
        sample(
            &page,
            &format!(r#"flowmon_tcp_flags_total{{flag="{f}",side="{side}"}}"#),
        )
        .unwrap() as u32
    };
    assert_eq!(
        [
            flag("syn", "client"),
            flag("synack", "server"),
            flag("fin", "client"),
            flag("fin", "server"),
            flag("rst", "client"),
            flag("rst", "server")
        ],
        [clt.syn, srv.synack, clt.fin, srv.fin, clt.rst, srv.rst]
    );
    let pkts = |side: &str| {
        sample(
            &page,
            &format!(r#"flowmon_tcp_packets_total{{side="{side}"}}"#),
        )
        .unwrap() as u64
    };
    assert_eq!((pkts("client"), pkts("server")), (clt.packets, srv.packets));
    assert_eq!(
        sample(
            &page,
            &format!(r#"flowmon_connections_opened_total{{iface="{iface}"}}"#)
        ),
        Some(5.0)
    );
    assert_eq!(sample(&page, "flowmon_flows_evicted_total"), Some(0.0));
    assert_eq!(sample(&page, r#"flowmon_ipfix_records_total"#), Some(5.0));
    // The agent's own memory: the mapped flow table (78 MiB at the
    // default size) is the kernel's and is left out.
    let own = sample(&page, "flowmon_agent_resident_memory_bytes").unwrap();
    assert!(own > 1e6 && own < 64e6, "{own} bytes");

    // A real Prometheus scraped the same numbers.
    let query = |q: &str| -> Option<Vec<Value>> {
        let body = http_get(
            &pair.clt_ns,
            "127.0.0.1:9090",
            format!("/api/v1/query?query={}", urlencode(q)),
        )?;
        let v: Value = serde_json::from_str(&body).ok()?;
        Some(v["data"]["result"].as_array()?.clone())
    };
    let value = |r: &Value| r["value"][1].as_str().unwrap().parse::<f64>().unwrap();
    wait_for(
        "Prometheus to scrape the closes",
        Duration::from_secs(30),
        || {
            let r = query(r#"sum by (class) (flowmon_connections_closed_total{job="flowmon"})"#)?;
            let got: BTreeMap<String, f64> = r
                .iter()
                .map(|r| (r["metric"]["class"].as_str().unwrap().to_string(), value(r)))
                .collect();
            (got == BTreeMap::from([
                ("fin".into(), 2.0),
                ("refused".into(), 2.0),
                ("rst".into(), 1.0),
            ]))
            .then_some(())
        },
    );
    let up = query(r#"up{job="flowmon"}"#).unwrap();
    assert_eq!(value(&up[0]), 1.0);
    let rst_srv = query(r#"flowmon_tcp_flags_total{flag="rst",side="server"}"#).unwrap();
    assert_eq!(value(&rst_srv[0]), f64::from(srv.rst));
    prometheus.stop();

    agent.stop();
    tcpdump.stop();
    nfcapd.stop();

    // --- Snapshots: every close once, interval rows that add up.
    let mut lines = Vec::new();
    for e in std::fs::read_dir(&snaps).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        lines.extend(
            text.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap()),
        );
    }
    let conns: Vec<&Value> = lines.iter().filter(|l| l["type"] == "conn").collect();
    assert_eq!(
        by_port(&conns.iter().map(|v| (*v).clone()).collect::<Vec<_>>()),
        want
    );
    assert!(lines.iter().all(|l| l["schema"] == 1));
    let global: Vec<&Value> = lines
        .iter()
        .filter(|l| l["type"] == "interval" && l["scope"] == "global")
        .collect();
    let sum = |k: &str| global.iter().map(|r| r[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(
        (sum("conns"), sum("opened"), sum("close.refused")),
        (5, 5, 2)
    );
    assert_eq!(
        (sum("rst.count.clt"), sum("rst.count.srv")),
        (u64::from(clt.rst), u64::from(srv.rst))
    );
    let per_port: u64 = lines
        .iter()
        .filter(|l| l["type"] == "interval" && l["scope"] == "port" && l["key"] == "9")
        .map(|r| r["close.refused"].as_u64().unwrap())
        .sum();
    assert_eq!(per_port, 2);

    // --- History: survives a restart, and answers without an agent.
    let agent = Agent::start(
        &pair.clt_ns,
        &["--iface", &pair.clt_if, "--socket", &sock, "--db", &db],
    );
    assert_eq!(
        by_port(&finished(&["flows", "--socket", &sock, "--since", "1h"])),
        want
    );
    agent.stop();
    let out = flowmon(&[
        "flows", "--since", "1h", "--db", &db, "--socket", &sock, "--json",
    ]);
    assert_eq!(by_port(&rows(&out)), want);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "flowmon: no agent is running; answering from the history in {db} (finished connections only)\n"
        )
    );
    let top = rows(&flowmon(&[
        "top", "servers", "--since", "1h", "--db", &db, "--socket", &sock, "--json",
    ]));
    assert_eq!(
        (
            top[0]["conns"].as_u64(),
            top[0]["rst.count.srv"].as_u64(),
            top[0]["close.refused"].as_u64()
        ),
        (Some(5), Some(u64::from(srv.rst)), Some(2))
    );
    let diag = rows(&flowmon(&[
        "diagnose", "--since", "1h", "--db", &db, "--socket", &sock, "--json",
    ]));
    assert_eq!(
        (diag[0]["kind"].as_str(), diag[0]["server.port"].as_u64()),
        (Some("refused"), Some(9))
    );
    // Nothing in the last millisecond... of a history that ended a while ago.
    assert!(
        rows(&flowmon(&[
            "flows", "--since", "1ms", "--db", &db, "--socket", &sock, "--json"
        ]))
        .is_empty()
    );

    // --- Graphs from the history.
    let text = common::succeeded(&flowmon(&["graph", "--db", &db, "--since", "1h"]));
    assert!(
        text.starts_with("RST per connection (all connections)\n")
            && text.contains("c client   s server"),
        "{text}"
    );
    let svg = d("rst.svg");
    assert!(
        flowmon(&["graph", "--db", &db, "--svg", &svg])
            .status
            .success()
    );
    assert_eq!(
        std::fs::read_to_string(&svg)
            .unwrap()
            .matches(r#"stroke-width="2""#)
            .count(),
        4
    );
    let png = d("closes.png");
    let srv_ip = pair.srv_v4.to_string();
    common::succeeded(&flowmon(&[
        "graph", "--db", &db, "--metric", "closes", "--server", &srv_ip, "--png", &png,
    ]));
    assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
    let out = flowmon(&["graph", "--db", &d("none.db")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`flowmon run` writes it there"));

    // --- IPFIX as tshark decodes it: one biflow record per connection.
    let fields = cflow_fields(
        &ipfix_pcap,
        &[
            "cflow.srcaddr",
            "cflow.dstaddr",
            "cflow.srcport",
            "cflow.dstport",
            "cflow.packets",
            "cflow.octets",
            "cflow.total_tcp_syn",
            "cflow.total_tcp_fin",
            "cflow.total_tcp_rst",
            "cflow.flow_end_reason",
            "cflow.biflow_direction",
        ],
    );
    let mut records = BTreeMap::new();
    for f in &fields {
        for i in 0..f[2].len() {
            let n = |col: usize, k: usize| f[col][k].parse::<u64>().unwrap();
            let pair2 = |col: usize| [n(col, 2 * i), n(col, 2 * i + 1)];
            let sport = n(2, i) as u16;
            records.insert(
                sport,
                (
                    f[0][i].parse::<IpAddr>().unwrap(),
                    f[1][i].parse::<IpAddr>().unwrap(),
                    n(3, i) as u16,
                    pair2(4),
                    pair2(5),
                    [pair2(6), pair2(7), pair2(8)],
                    n(9, i),
                    n(10, i),
                ),
            );
        }
    }
    assert_eq!(
        records.keys().copied().collect::<Vec<_>>(),
        want.keys().copied().collect::<Vec<_>>()
    );
    for (port, (src, dst, dport, packets, octets, [syn, fin, rst], reason, biflow)) in &records {
        let server_port = if refused.contains(port) { 9 } else { 8080 };
        let c = (pair.clt_v4, *port);
        let s = (pair.srv_v4, server_port);
        let (up, down) = common::both_ways(&wire, c, s);
        assert_eq!(
            (*src, *dst, *dport),
            (pair.clt_v4, pair.srv_v4, server_port)
        );
        assert_eq!(*packets, [up.packets, down.packets], "port {port}");
        assert_eq!(*octets, [up.bytes, down.bytes], "port {port}");
        assert_eq!(
            *syn,
            [u64::from(up.syn), u64::from(down.synack)],
            "port {port}"
        );
        assert_eq!(
            *fin,
            [u64::from(up.fin), u64::from(down.fin)],
            "port {port}"
        );
        assert_eq!(
            *rst,
            [u64::from(up.rst), u64::from(down.rst)],
            "port {port}"
        );
        assert_eq!(
            (*reason, *biflow),
            (3, 1),
            "end of flow detected, source is the initiator"
        );
    }
    // The close class in flowmon's enterprise element (1 fin, 3 rst, 4 refused).
    let verbose = Command::new("tshark")
        .args(["-r", &ipfix_pcap, "-d", "udp.port==4739,cflow", "-V"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&verbose.stdout);
    let mut codes = BTreeMap::new();
    let mut port = 0;
    for line in text.lines().map(str::trim) {
        if let Some(p) = line.strip_prefix("SrcPort: ") {
            port = p.parse::<u16>().unwrap();
        }
        if let Some(v) = line.split("Type 1: Value (hex bytes): ").nth(1) {
            codes.insert(
                port,
                match v {
                    "01" => "fin",
                    "03" => "rst",
                    "04" => "refused",
                    o => panic!("code {o}"),
                },
            );
        }
    }
    assert_eq!(
        codes
            .into_iter()
            .map(|(p, c)| (p, c.to_string()))
            .collect::<BTreeMap<_, _>>(),
        want
    );

    // --- The same stream collected by nfcapd and read by nfdump.
    let file = std::fs::read_dir(d("nfcapd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("nfcapd.2")
        })
        .expect("nfcapd wrote a file");
    let csv = common::succeeded(
        &Command::new("nfdump")
            .arg("-r")
            .arg(&file)
            .args(["-q", "-o", "csv"])
            .output()
            .unwrap(),
    );
    let mut flows = BTreeMap::new();
    for line in csv.lines().filter(|l| l.contains(&pair.clt_v4.to_string())) {
        // ts,te,td,sa,da,sp,dp,pr,flg,fwd,stos,ipkt,ibyt,opkt,obyt,...
        let f: Vec<&str> = line.split(',').collect();
        let n = |i: usize| f[i].trim().parse::<u64>().unwrap();
        flows.insert(
            n(5) as u16,
            (
                f[3].to_string(),
                n(6) as u16,
                [n(11), n(13)],
                [n(12), n(14)],
            ),
        );
    }
    assert_eq!(flows.len(), 5, "{csv}");
    for (port, (sa, dp, packets, bytes)) in flows {
        let (_, _, dport, p, o, ..) = records[&port];
        assert_eq!(
            (sa, dp, packets, bytes),
            (pair.clt_v4.to_string(), dport, p, o),
            "port {port}"
        );
    }
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn long_lived_connections_get_active_timeout_records() {
    let pair = Pair::new();
    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("ipfix.pcap").to_string_lossy().into_owned();
    let sock = dir.path().join("api.sock").to_string_lossy().into_owned();
    let tcpdump = ipfix_capture(&pair.clt_ns, &pcap);
    let agent = Agent::quick(
        &pair,
        &sock,
        &[
            "--no-history",
            "--ipfix",
            "udp://127.0.0.1:4739",
            "--ipfix-active-timeout",
            "1s",
        ],
    );
    let capture = pair.capture();
    let srv = pair.srv_v4;
    let l = Pair::in_ns(&pair.srv_ns, move || {
        std::net::TcpListener::bind((srv, 8081)).unwrap()
    });
    let server = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut b = [0u8; 4];
        while s.read_exact(&mut b).is_ok() {
            s.write_all(b"pong").unwrap();
        }
    });
    // About 2.5 s of traffic: two active-timeout records, then the end. No
    // collector listens, so every other send meets the ICMP refusal of the
    // previous one: the exporter must send again, not lose the record.
    let port = Pair::in_ns(&pair.clt_ns, move || {
        let (sock, local) = common::bound_socket(srv);
        sock.connect(&std::net::SocketAddr::new(srv, 8081).into())
            .unwrap();
        let mut c: TcpStream = sock.into();
        for _ in 0..25 {
            c.write_all(b"ping").unwrap();
            let mut b = [0u8; 4];
            c.read_exact(&mut b).unwrap();
            thread::sleep(Duration::from_millis(100));
        }
        local
    });
    server.join().unwrap();
    wait_for("the close to be reported", Duration::from_secs(10), || {
        let f = rows(&flowmon(&["flows", "--socket", &sock, "--json"]));
        f.iter()
            .any(|r| r["client.port"] == port && r["close"] == "fin")
            .then_some(())
    });
    let wire = capture.finish();
    agent.stop();
    tcpdump.stop();
    let fields = cflow_fields(
        &pcap,
        &["cflow.srcport", "cflow.packets", "cflow.flow_end_reason"],
    );
    let mut reasons = Vec::new();
    let mut sums = [0u64; 2];
    for message in &fields {
        let f: Vec<Vec<u64>> = message
            .iter()
            .map(|c| c.iter().map(|s| s.parse().unwrap()).collect())
            .collect();
        for i in 0..f[0].len() {
            if f[0][i] == u64::from(port) {
                reasons.push(f[2][i]);
                sums[0] += f[1][2 * i];
                sums[1] += f[1][2 * i + 1];
            }
        }
    }
    // Active records (2) every second while open, then "end of flow" (3).
    assert!(reasons.len() >= 3, "{reasons:?}");
    assert!(
        reasons[..reasons.len() - 1].iter().all(|r| *r == 2) && reasons.last() == Some(&3),
        "{reasons:?}"
    );
    // Deltas: the records add up to exactly what crossed the wire.
    let (up, down) = common::both_ways(&wire, (pair.clt_v4, port), (srv, 8081));
    assert_eq!(sums, [up.packets, down.packets]);
}

#[test]
fn the_example_scrape_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/prometheus.yml");
    common::succeeded(
        &Command::new("promtool")
            .args(["check", "config"])
            .arg(&path)
            .output()
            .unwrap(),
    );
}
