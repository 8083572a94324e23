//! Restart without loss: with `--persist`, maps and links are pinned, the
//! kernel keeps counting while the agent is down (killed with SIGKILL), and
//! the next agent reports every connection exactly once with exactly the
//! capture's counts. `flowmon detach` then removes everything.

mod common;

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use common::{Agent, Pair, both_ways, bound_socket, flowmon, rows, xdp_attached};
use serde_json::Value;

/// A BPF filesystem of the test's own, mounted where `ip netns exec` (which
/// mounts a fresh /sys) still sees it; unmounted on drop.
struct Bpffs(std::path::PathBuf);

impl Bpffs {
    fn mount(dir: &std::path::Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        common::sh(&["mount", "-t", "bpf", "bpf", &dir.to_string_lossy()]);
        Self(dir.to_path_buf())
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn history(db: &str) -> Vec<Value> {
    rows(&flowmon(&[
        "flows",
        "--since",
        "1h",
        "--db",
        db,
        "--socket",
        "/nonexistent",
        "--json",
    ]))
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_killed_agent_loses_and_doubles_nothing() {
    killed_agent(&[], "(XDP pinned, TC egress)", true);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_killed_agent_counting_at_tc_ingress_loses_and_doubles_nothing() {
    killed_agent(&["--ingress", "tc"], "(TC ingress and egress)", false);
}

/// Runs an agent with `--persist` (and `extra`), kills it, lets traffic
/// flow with no agent, resumes from the pins (its banner naming `hooks`)
/// and checks every connection was reported once with the wire's counts.
fn killed_agent(extra: &[&str], hooks: &str, xdp: bool) {
    let pair = Pair::new();
    let dir = tempfile::tempdir().unwrap();
    let bpffs = Bpffs::mount(&dir.path().join("bpf"));
    let pins = bpffs.0.join("flowmon").to_string_lossy().into_owned();
    let db = dir.path().join("history.db").to_string_lossy().into_owned();
    let sock = dir.path().join("api.sock").to_string_lossy().into_owned();
    let mut args = vec!["--db", db.as_str(), "--persist", "--pin-dir", &pins];
    args.extend(extra);
    let capture = pair.capture();
    let srv = pair.srv_v4;
    let l = Pair::in_ns(&pair.srv_ns, move || {
        TcpListener::bind((srv, 8082)).unwrap()
    });
    let server = thread::spawn(move || {
        for _ in 0..9 {
            let (mut s, _) = l.accept().unwrap();
            thread::spawn(move || {
                let mut b = [0u8; 4];
                while s.read_exact(&mut b).is_ok() {
                    s.write_all(b"pong").unwrap();
                }
            });
        }
    });
    let connect = |n: usize| -> Vec<(u16, TcpStream)> {
        Pair::in_ns(&pair.clt_ns, move || {
            (0..n)
                .map(|_| {
                    let (sock, local) = bound_socket(srv);
                    sock.connect(&SocketAddr::new(srv, 8082).into()).unwrap();
                    (local, sock.into())
                })
                .collect()
        })
    };
    let ping = |c: &mut TcpStream| {
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).unwrap();
    };
    let mut ports = Vec::new();

    // Agent A reports three connections, and sees three more open.
    let a = Agent::quick(&pair, &sock, &args);
    for (p, mut c) in connect(3) {
        ping(&mut c);
        ports.push(p);
    }
    let mut open = connect(3);
    for (p, c) in &mut open {
        ping(c);
        ports.push(*p);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while history(&db).len() < 3 {
        assert!(
            Instant::now() < deadline,
            "agent A did not report the first three"
        );
        thread::sleep(Duration::from_millis(100));
    }
    // SIGKILL: no chance to clean up or flush anything.
    let mut a = a;
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    assert_eq!(
        xdp_attached(&pair.clt_ns, &pair.clt_if),
        xdp,
        "the pinned program stays attached"
    );

    // While no agent runs: the open ones talk and close, three more come and go.
    for (_, c) in &mut open {
        ping(c);
    }
    drop(open);
    for (p, mut c) in connect(3) {
        ping(&mut c);
        ports.push(p);
    }
    server.join().unwrap();

    // Agent B resumes from the pins and reports the rest.
    let b = Agent::quick(&pair, &sock, &args);
    assert!(
        b.banner.contains("resuming the table pinned in"),
        "{}",
        b.banner
    );
    assert!(b.banner.contains(hooks), "{}", b.banner);
    let deadline = Instant::now() + Duration::from_secs(10);
    while history(&db).len() < 9 {
        assert!(
            Instant::now() < deadline,
            "agent B did not report all nine: {:?}",
            history(&db)
        );
        thread::sleep(Duration::from_millis(100));
    }
    let wire = capture.finish();
    b.stop();
    assert_eq!(
        xdp_attached(&pair.clt_ns, &pair.clt_if),
        xdp,
        "a stopped --persist agent leaves the programs"
    );

    // Each connection exactly once, with exactly the wire's counts.
    let records = history(&db);
    let mut seen: BTreeMap<u16, usize> = BTreeMap::new();
    for r in &records {
        let port = r["client.port"].as_u64().unwrap() as u16;
        *seen.entry(port).or_default() += 1;
        let (up, down) = both_ways(&wire, (pair.clt_v4, port), (srv, 8082));
        let got = [
            "pkts.clt",
            "pkts.srv",
            "bytes.clt",
            "bytes.srv",
            "fin.count.clt",
            "fin.count.srv",
            "rst.count",
        ]
        .map(|k| r[k].as_u64().unwrap());
        assert_eq!(
            got,
            [
                up.packets,
                down.packets,
                up.bytes,
                down.bytes,
                u64::from(up.fin),
                u64::from(down.fin),
                0
            ],
            "port {port}"
        );
        assert_eq!(r["close"], "fin", "port {port}");
    }
    ports.sort();
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), ports);
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");

    // detach removes the links (so the programs) and the maps.
    let text = common::succeeded(&flowmon(&["detach", "--pin-dir", &pins]));
    assert_eq!(text.lines().count(), 7, "two links and five maps: {text}");
    assert!(!xdp_attached(&pair.clt_ns, &pair.clt_if));
    assert!(!std::path::Path::new(&pins).exists());
    // A pin directory that is not on a BPF filesystem is refused clearly.
    let out = flowmon(&[
        "run",
        "--iface",
        "lo",
        "--persist",
        "--pin-dir",
        "/tmp/flowmon-not-bpffs",
        "--no-history",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not on a BPF filesystem"));
}

/// A table pinned by an agent that hashed keys otherwise (another
/// `TABLE_LAYOUT`) is refused, naming `flowmon detach`, rather than read
/// with every entry looked for in the wrong bucket.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_table_pinned_with_another_layout_is_refused() {
    use flowmon::kernel::{Kernel, KernelError, LoadOptions};
    use flowmon_common::flow::Config;
    let tmp = tempfile::tempdir().unwrap();
    let fs = Bpffs::mount(&tmp.path().join("bpf"));
    let pin = fs.0.join("flowmon");
    let opts = || LoadOptions {
        max_flows: 1024,
        pin: Some(pin.clone()),
        ..LoadOptions::default()
    };
    drop(Kernel::load(opts()).unwrap());
    // As an agent of layout 1 would have left it.
    let map = aya::maps::MapData::from_pin(pin.join("CONFIG")).unwrap();
    let mut config: aya::maps::Array<_, Config> =
        aya::maps::Array::try_from(aya::maps::Map::Array(map)).unwrap();
    let mut c = config.get(&0, 0).unwrap();
    assert_eq!(c.table_layout, flowmon_common::table::TABLE_LAYOUT);
    c.table_layout = 1;
    config.set(0, &c, 0).unwrap();
    let err = Kernel::load(opts()).err().expect("refused");
    assert!(
        matches!(err, KernelError::PinnedLayout { found: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("flowmon detach"), "{err}");
    // The same table, put back as this agent laid it out, resumes.
    c.table_layout = flowmon_common::table::TABLE_LAYOUT;
    config.set(0, &c, 0).unwrap();
    assert!(Kernel::load(opts()).unwrap().resumed());
    // Loading writes the programs' config (their global data) afresh; a
    // resumed table keeps its own: seed, size, removals.
    let kept = config.get(&0, 0).unwrap();
    assert_eq!(
        (kept.seeds, kept.buckets, kept.max_flows, kept.agent_removed),
        (c.seeds, c.buckets, c.max_flows, c.agent_removed)
    );
    assert_ne!(kept.seeds, flowmon_common::table::Seeds::default());
}
