//! Every command given wrong arguments, missing or damaged captures, no
//! history or no agent: the exit code the README documents, and a message
//! that says what went wrong and what to do.

mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixListener,
    process::Command,
};

const BIN: &str = env!("CARGO_BIN_EXE_flowmon");

/// Runs flowmon and returns (exit code, stderr).
fn fails(args: &[&str]) -> (i32, String) {
    fails_as(Command::new(BIN).args(args))
}

fn fails_as(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code().expect("exited"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn trace(rel: &str) -> String {
    common::testdata()
        .join("traces")
        .join(rel)
        .to_string_lossy()
        .into_owned()
}

#[test]
fn every_command_fails_clearly_with_its_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    std::fs::write(p("garbage.pcap"), b"this is not a capture at all").unwrap();
    std::fs::write(p("empty.pcap"), b"").unwrap();
    let get = trace("http/get.pcap");
    let whole = std::fs::read(&get).unwrap();
    std::fs::write(p("cut.pcap"), &whole[..whole.len() - 7]).unwrap();
    // A socket file nobody answers on (an agent that died).
    drop(UnixListener::bind(p("stale.sock")).unwrap());
    let (nosock, stale) = (p("none.sock"), p("stale.sock"));
    let (garbage, empty) = (p("garbage.pcap"), p("empty.pcap"));
    let nodb = p("none/history.db");
    let no_agent = "no flowmon agent is listening on";
    let not_capture = "is not a pcap or pcapng capture (its file header is unreadable)";
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        // Arguments: clap's usage errors.
        (vec![], 2, "Usage: flowmon"),
        (vec!["nosuch"], 2, "unrecognized subcommand 'nosuch'"),
        (vec!["analyze"], 2, "required arguments were not provided"),
        (vec!["top"], 2, "<SIDE>"),
        (
            vec!["flows", "--limit", "x"],
            2,
            "invalid value 'x' for '--limit <N>'",
        ),
        (
            vec!["graph", "--metric", "nosuch"],
            2,
            "possible values: rst-per-conn",
        ),
        (
            vec!["run", "--interval", "0s"],
            2,
            "must be greater than zero",
        ),
        (vec!["run", "--max-flows", "0"], 2, "0 is not in 1.."),
        (
            vec!["run", "--ipfix", "10.0.0.1"],
            2,
            "write the collector as udp://HOST:PORT",
        ),
        (vec!["run", "--metrics", "nope"], 2, "write PORT or IP:PORT"),
        (
            vec![
                "run",
                "--snapshot-dir",
                "/tmp",
                "--snapshot-max-bytes",
                "1Q",
            ],
            2,
            "the unit is K, M or G",
        ),
        (vec!["run", "--retention", "7y"], 2, "unknown unit"),
        // Queries that are wrong in themselves.
        (
            vec!["flows", "--pcap", &get, "--filter", "rst.count >"],
            2,
            "at position 12",
        ),
        (
            vec!["flows", "--pcap", &get, "--filter", "fin.cnt = 0"],
            2,
            "did you mean fin.count?",
        ),
        (
            vec!["conversations", "--pcap", &get, "--sort", "nosuch"],
            2,
            "cannot sort by `nosuch`",
        ),
        (
            vec!["status", "--pcap", &get],
            2,
            "unexpected argument '--pcap'",
        ),
        // Captures: missing, a folder, not a capture, empty.
        (
            vec!["analyze", "/nonexistent.pcap"],
            1,
            "cannot open capture /nonexistent.pcap: No such file",
        ),
        (
            vec!["analyze", "/tmp"],
            1,
            "cannot open capture /tmp: Is a directory",
        ),
        (vec!["analyze", &garbage], 1, not_capture),
        (vec!["analyze", &empty], 1, not_capture),
        (vec!["flows", "--pcap", &garbage], 1, not_capture),
        (
            vec!["diagnose", "--pcap", "/nonexistent.pcap"],
            1,
            "cannot open capture",
        ),
        // No agent: every query and status, socket missing or stale.
        (vec!["flows", "--socket", &nosock], 3, no_agent),
        (vec!["top", "clients", "--socket", &stale], 3, no_agent),
        (vec!["conversations", "--socket", &nosock], 3, no_agent),
        (vec!["diagnose", "--socket", &stale], 3, no_agent),
        (vec!["status", "--socket", &nosock], 3, no_agent),
        (
            vec!["status", "--socket", &stale],
            3,
            "start one with `flowmon run`",
        ),
        // No history.
        (vec!["graph", "--db", &nodb], 1, "no history at"),
        (
            vec!["flows", "--since", "1h", "--socket", &nosock, "--db", &nodb],
            1,
            "`flowmon run` writes it there",
        ),
    ];
    for (args, code, says) in &cases {
        let (got, err) = fails(args);
        assert_eq!(got, *code, "flowmon {args:?}: {err}");
        assert!(
            err.contains(says),
            "flowmon {args:?} should say {says:?}: {err}"
        );
    }

    // A capture cut short inside a packet: what precedes it is analysed, and
    // the warning says where reading stopped.
    let out = Command::new(BIN)
        .args(["analyze", &p("cut.pcap")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("packet 14 is cut short or damaged")
            && err.contains("the 13 packets before it are analysed"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 connections; 13 packets"));
}

#[test]
fn an_agent_that_answers_garbage_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        (&s).write_all(b"<html>hello</html>\n").unwrap();
    });
    let (code, err) = fails(&["status", "--socket", &sock.to_string_lossy()]);
    server.join().unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("answered something that is not a flowmon reply"),
        "{err}"
    );
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn an_unprivileged_user_is_told_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    // A root-only socket, as the agent makes it.
    let sock = dir.path().join("api.sock");
    let _l = flowmon::api::bind(&sock).unwrap();
    let capture = dir.path().join("root-only.pcap");
    std::fs::copy(trace("http/get.pcap"), &capture).unwrap();
    std::fs::set_permissions(
        &capture,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let nobody = |args: &[&str]| {
        fails_as(
            Command::new("setpriv")
                .args(common::AS_NOBODY)
                .arg(BIN)
                .args(args),
        )
    };
    let (code, err) = nobody(&["status", "--socket", &sock.to_string_lossy()]);
    assert_eq!(code, 77, "{err}");
    assert!(
        err.contains("the API socket is root-only; run as root"),
        "{err}"
    );
    let (code, err) = nobody(&["analyze", &capture.to_string_lossy()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    let (code, err) = nobody(&["replay", &trace("http/get.pcap")]);
    assert_eq!(code, 77, "{err}");
    assert!(err.contains("CAP_BPF"), "{err}");
}
