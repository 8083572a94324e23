//! The `flowmon` binary as a user runs it: `run --json` in a network
//! namespace with real connections, nothing left attached after it exits,
//! and the errors for a missing privilege, an unknown interface and an
//! interface whose XDP hook is taken. Needs root: `cargo xtask test`.

mod common;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    thread,
};

use common::{Pair, xdp_attached};
use flowmon::kernel::{Kernel, KernelError, LoadOptions, XdpAttach};

const BIN: &str = env!("CARGO_BIN_EXE_flowmon");

fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, BIN]).args(args);
    c
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn run_json_counts_a_connection_and_detaches_on_exit() {
    let pair = Pair::new();
    let sock = format!("/tmp/{}-api.sock", pair.clt_ns);
    let mut child = in_ns(
        &pair.clt_ns,
        &[
            "run",
            "--iface",
            &pair.clt_if,
            "--json",
            "--interval",
            "300ms",
            "--linger",
            "500ms",
            "--socket",
            &sock,
            "--no-history",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(
        line.contains(&format!("watching {} (XDP native, TC egress)", pair.clt_if)),
        "{line}"
    );
    assert!(xdp_attached(&pair.clt_ns, &pair.clt_if));

    let capture = pair.capture();
    let srv = pair.srv_v4;
    let l = Pair::in_ns(&pair.srv_ns, move || {
        TcpListener::bind((srv, 8080)).unwrap()
    });
    let server = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        s.write_all(b"pong").unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
    });
    let client_port = Pair::in_ns(&pair.clt_ns, move || {
        let mut c = TcpStream::connect((srv, 8080)).unwrap();
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).unwrap();
        c.local_addr().unwrap().port()
    });
    server.join().unwrap();

    // Each poll lists the live connections that changed and, under
    // "closed", those that finished (after the linger) and left the table.
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut closed: Option<serde_json::Value> = None;
    for _ in 0..100 {
        let mut l = String::new();
        assert!(
            out.read_line(&mut l).unwrap() > 0,
            "flowmon stopped printing"
        );
        let v: serde_json::Value = serde_json::from_str(&l).expect("one JSON object per line");
        assert_eq!(v["schema"], 1);
        if let Some(c) = v["closed"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["client.port"] == client_port)
        {
            closed = Some(c.clone());
            break;
        }
    }
    let wire = capture.finish();
    let c = closed.expect("the connection was reported closed");
    assert_eq!(
        (
            c["close"].as_str(),
            c["closed_by"].as_str(),
            c["conn_state"].as_str(),
            c["ct.count"].as_u64()
        ),
        (Some("fin"), Some("client"), Some("SF"), Some(1))
    );
    assert_eq!(c["client.ip"], pair.clt_v4.to_string());
    assert_eq!(c["server.ip"], srv.to_string());
    assert_eq!(c["server.port"], 8080);
    assert_eq!(c["iface"], pair.clt_if);
    assert_eq!(
        (c["syn.count.clt"].as_u64(), c["synack.count.srv"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(
        (
            c["fin.count.clt"].as_u64(),
            c["fin.count.srv"].as_u64(),
            c["rst.count"].as_u64()
        ),
        (Some(1), Some(1), Some(0))
    );
    let up = wire[&(pair.clt_v4, client_port, srv, 8080)];
    let down = wire[&(srv, 8080, pair.clt_v4, client_port)];
    assert_eq!(
        (c["pkts.clt"].as_u64(), c["bytes.clt"].as_u64()),
        (Some(up.packets), Some(up.bytes)),
        "{c}"
    );
    assert_eq!(
        (c["pkts.srv"].as_u64(), c["bytes.srv"].as_u64()),
        (Some(down.packets), Some(down.bytes)),
        "{c}"
    );
    assert_eq!(
        (c["data_pkts.clt"].as_u64(), c["data_pkts.srv"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(c["direction_guessed"], false);

    // SIGTERM: flowmon detaches and exits 0.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("flowmon: detached"), "{rest}");
    assert!(
        !xdp_attached(&pair.clt_ns, &pair.clt_if),
        "XDP left attached"
    );
    let links = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pair.clt_ns,
            "bpftool",
            "net",
            "show",
            "dev",
            &pair.clt_if,
        ])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains("flowmon"), "TC left attached: {links}");
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn missing_privilege_names_the_capabilities() {
    let out = Command::new("setpriv")
        .args(common::AS_NOBODY)
        .args([BIN, "run", "--iface", "lo"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert!(err.contains("CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON"), "{err}");
    assert!(err.contains("run it as root"), "{err}");
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn unknown_interface() {
    let pair = Pair::new();
    let out = in_ns(&pair.clt_ns, &["run", "--iface", "nosuch0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no interface named \"nosuch0\"") && err.contains("ip link"),
        "{err}"
    );
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn xdp_hook_taken_is_named() {
    let pair = Pair::new();
    let ns = pair.clt_ns.clone();
    let iface = pair.clt_if.clone();
    // A first flowmon holds the XDP hook through a BPF link.
    let held = Pair::in_ns(&ns, move || {
        let mut first = Kernel::load(LoadOptions {
            max_flows: 64,
            ..LoadOptions::default()
        })
        .unwrap();
        first.attach(&iface, XdpAttach::Native, false).unwrap();
        let mut second = Kernel::load(LoadOptions {
            max_flows: 64,
            ..LoadOptions::default()
        })
        .unwrap();
        let err = second.attach(&iface, XdpAttach::Native, false).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, KernelError::XdpInUse { .. }), "{err:?}");
        // A hook held through a BPF link cannot be taken over from outside,
        // even with --replace-xdp (only netlink attachments can): same error.
        let again = second.attach(&iface, XdpAttach::Native, true).unwrap_err();
        (msg, again.to_string())
    });
    assert!(
        held.0
            .contains("already has an XDP program attached (program \"flowmon_xdp\""),
        "{}",
        held.0
    );
    assert!(held.0.contains("--replace-xdp"), "{}", held.0);
    assert!(
        held.1.contains("already has an XDP program attached"),
        "{}",
        held.1
    );
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn runs_with_only_the_service_units_capabilities() {
    // What flowmon.service grants: three capabilities, no CAP_SETPCAP to
    // trim the bounding set with, no new privileges.
    let pair = Pair::new();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock").to_string_lossy().into_owned();
    let agent = common::Agent::quick_under(
        &pair,
        &[
            "setpriv",
            "--bounding-set=-all,+bpf,+net_admin,+perfmon",
            "--inh-caps=-all",
            "--no-new-privs",
        ],
        &sock,
        &["--no-history"],
    );
    let status = common::rows(&common::flowmon(&["status", "--socket", &sock, "--json"]));
    assert_eq!(status[0]["capabilities"], serde_json::json!([]));
    // The coarse clock was calibrated with only the unit's capabilities.
    assert!(
        flowmon::ticks::TICKS_NS.contains(&status[0]["tick_ns"].as_u64().unwrap_or(0)),
        "{}",
        status[0]
    );
    // The bounding set is the unit's (no CAP_SETPCAP to trim it); the rest is empty.
    for (set, mask) in common::capability_masks(agent.child.id()) {
        if set != "CapBnd" {
            assert_eq!(mask, 0, "{set}");
        }
    }
    // With nothing left, it still counts and reports a connection.
    let srv = pair.srv_v4;
    let l = Pair::in_ns(&pair.srv_ns, move || {
        TcpListener::bind((srv, 8093)).unwrap()
    });
    let server = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
    });
    Pair::in_ns(&pair.clt_ns, move || {
        let mut c = TcpStream::connect((srv, 8093)).unwrap();
        c.write_all(b"ping").unwrap();
    });
    server.join().unwrap();
    let rows = common::wait_for("the connection", std::time::Duration::from_secs(10), || {
        let rows = common::rows(&common::flowmon(&[
            "flows",
            "--socket",
            &sock,
            "--json",
            "--filter",
            "close = fin",
        ]));
        (!rows.is_empty()).then_some(rows)
    });
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["server.port"], 8093);
    agent.stop();
    assert!(
        !xdp_attached(&pair.clt_ns, &pair.clt_if),
        "detached without privileges"
    );
}
