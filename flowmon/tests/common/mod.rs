//! Helpers for the privileged tests: network namespaces joined by a veth
//! pair, threads that run inside a namespace, and tshark as the ground truth
//! for what crossed the wire.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{
    collections::HashMap,
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, TcpStream},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};

/// Runs a command and panics with its output when it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A client socket bound to an ephemeral port, before connect, so the test
/// knows the port even when the connect fails.
pub fn bound_socket(srv: IpAddr) -> (socket2::Socket, u16) {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(std::net::SocketAddr::new(srv, 0)),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    let any: IpAddr = if srv.is_ipv4() {
        "0.0.0.0".parse().unwrap()
    } else {
        "::".parse().unwrap()
    };
    sock.bind(&std::net::SocketAddr::new(any, 0).into())
        .unwrap();
    let local = sock.local_addr().unwrap().as_socket().unwrap().port();
    (sock, local)
}

/// Makes close() send RST instead of FIN.
pub fn set_linger_zero(fd: i32) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // Safety: valid socket and a correctly sized option value.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            size_of::<libc::linger>() as u32,
        )
    };
    assert_eq!(r, 0, "SO_LINGER");
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Two namespaces, `clt` and `srv`, joined by a veth pair with IPv4 and
/// IPv6 addresses. Offloads are off so every skb is one wire packet, which
/// makes a capture on the veth an exact ground truth. Deleted on drop.
pub struct Pair {
    pub clt_ns: String,
    pub srv_ns: String,
    pub clt_if: String,
    pub srv_if: String,
    pub clt_v4: IpAddr,
    pub srv_v4: IpAddr,
    pub clt_v6: IpAddr,
    pub srv_v6: IpAddr,
}

impl Pair {
    pub fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{n}", std::process::id() % 100_000);
        let subnet = (std::process::id() % 200 + n * 7) % 250 + 1;
        let p = Self {
            clt_ns: format!("fmc{id}"),
            srv_ns: format!("fms{id}"),
            clt_if: format!("fmc{id}"),
            srv_if: format!("fms{id}"),
            clt_v4: format!("10.250.{subnet}.2").parse().unwrap(),
            srv_v4: format!("10.250.{subnet}.1").parse().unwrap(),
            clt_v6: format!("fd00:250:{subnet}::2").parse().unwrap(),
            srv_v6: format!("fd00:250:{subnet}::1").parse().unwrap(),
        };
        for ns in [&p.clt_ns, &p.srv_ns] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        sh(&[
            "ip", "link", "add", &p.clt_if, "netns", &p.clt_ns, "type", "veth", "peer", "name",
            &p.srv_if, "netns", &p.srv_ns,
        ]);
        for (ns, ifn, v4, v6) in [
            (&p.clt_ns, &p.clt_if, p.clt_v4, p.clt_v6),
            (&p.srv_ns, &p.srv_if, p.srv_v4, p.srv_v6),
        ] {
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v4}/24"),
                "dev",
                ifn,
            ]);
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                ifn,
                "nodad",
            ]);
            sh(&[
                "ip", "netns", "exec", ns, "ethtool", "-K", ifn, "tso", "off", "gso", "off", "gro",
                "off",
            ]);
            sh(&["ip", "-n", ns, "link", "set", ifn, "up"]);
        }
        p
    }

    /// Runs `f` on a thread that has entered namespace `ns`. Sockets it
    /// creates stay in that namespace wherever they are used afterwards.
    pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{ns}");
        thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("namespace thread panicked")
    }

    /// Starts a capture of TCP on the client's veth.
    pub fn capture(&self) -> Capture {
        self.capture_on(&self.clt_if, None, "eth")
    }

    /// Starts a capture of TCP in the client namespace on `iface` ("any"
    /// for all), with link type `link` (tcpdump's -y) if given.
    pub fn capture_on(&self, iface: &str, link: Option<&str>, tag: &str) -> Capture {
        let path = std::env::temp_dir().join(format!("{}-{tag}.pcap", self.clt_ns));
        let file = path.to_string_lossy().into_owned();
        let mut args = vec!["-i", iface, "-s", "128", "-B", "65536", "-w", &file];
        if let Some(l) = link {
            args.extend(["-y", l]);
        }
        args.push("tcp");
        let child = tcpdump(&self.clt_ns, &args);
        Capture { child, path }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.clt_ns, &self.srv_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A running tcpdump.
pub struct Capture {
    child: Child,
    pub path: PathBuf,
}

/// What one direction of a connection carried, as tshark reads the capture.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wire {
    pub packets: u64,
    pub bytes: u64,
    pub syn: u32,
    pub synack: u32,
    pub fin: u32,
    pub rst: u32,
}

impl Capture {
    /// Stops the capture and returns the file's path.
    pub fn stop(mut self) -> PathBuf {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        self.child.wait().unwrap();
        self.path.clone()
    }

    /// Stops the capture and returns per-direction counts keyed by
    /// (source address, source port, destination address, destination port).
    pub fn finish(mut self) -> HashMap<(IpAddr, u16, IpAddr, u16), Wire> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        self.child.wait().unwrap();
        let out = Command::new("tshark")
            .args(["-r"])
            .arg(&self.path)
            .args([
                "-T",
                "fields",
                "-E",
                "separator=/t",
                "-e",
                "ip.src",
                "-e",
                "ipv6.src",
                "-e",
                "ip.dst",
                "-e",
                "ipv6.dst",
            ])
            .args([
                "-e",
                "tcp.srcport",
                "-e",
                "tcp.dstport",
                "-e",
                "tcp.flags",
                "-e",
                "ip.len",
                "-e",
                "ipv6.plen",
            ])
            .output()
            .expect("run tshark");
        assert!(
            out.status.success(),
            "tshark: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if std::env::var_os("FLOWMON_KEEP_PCAP").is_none() {
            let _ = std::fs::remove_file(&self.path);
        }
        let mut map: HashMap<_, Wire> = HashMap::new();
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            let f: Vec<&str> = line.split('\t').collect();
            let pick = |a: &str, b: &str| {
                if a.is_empty() {
                    b.to_string()
                } else {
                    a.to_string()
                }
            };
            let src: IpAddr = pick(f[0], f[1]).parse().unwrap();
            let dst: IpAddr = pick(f[2], f[3]).parse().unwrap();
            let sport: u16 = f[4].parse().unwrap();
            let dport: u16 = f[5].parse().unwrap();
            let flags =
                u8::from_str_radix(f[6].trim_start_matches("0x"), 16).unwrap() as u32 & 0xff;
            let bytes: u64 = if f[7].is_empty() {
                40 + f[8].parse::<u64>().unwrap()
            } else {
                f[7].parse().unwrap()
            };
            let w = map.entry((src, sport, dst, dport)).or_default();
            w.packets += 1;
            w.bytes += bytes;
            if flags & 0x02 != 0 {
                if flags & 0x10 != 0 {
                    w.synack += 1
                } else {
                    w.syn += 1
                }
            }
            w.fin += u32::from(flags & 0x01 != 0);
            w.rst += u32::from(flags & 0x04 != 0);
        }
        map
    }
}

/// What a connection carried each way on the wire, client to server then
/// server to client (zero where a direction sent nothing).
pub fn both_ways(
    wire: &HashMap<(IpAddr, u16, IpAddr, u16), Wire>,
    client: (IpAddr, u16),
    server: (IpAddr, u16),
) -> (Wire, Wire) {
    let get = |a: (IpAddr, u16), b: (IpAddr, u16)| {
        wire.get(&(a.0, a.1, b.0, b.1)).copied().unwrap_or_default()
    };
    (get(client, server), get(server, client))
}

/// Polls `read` until two reads `quiet` apart are equal (the traffic has
/// stopped), giving up after `limit`. Bounded polling, not a fixed sleep.
pub fn settle<T: PartialEq>(mut read: impl FnMut() -> T, quiet: Duration, limit: Duration) -> T {
    let start = Instant::now();
    let mut last = read();
    loop {
        thread::sleep(quiet);
        let now = read();
        if now == last || start.elapsed() > limit {
            return now;
        }
        last = now;
    }
}

/// Client ports of the connections [`mixed_traffic`] made.
#[derive(Debug)]
pub struct Mix {
    /// Closed by FIN from both sides.
    pub graceful: Vec<u16>,
    /// Aborted by the client (SO_LINGER 0: RST) after an exchange.
    pub abort: u16,
    /// Refused: SYN to port 9, answered by RST.
    pub refused: Vec<u16>,
}

/// Real connections from the client to the server namespace: two graceful
/// closes and one client abort to `port`, two refusals on port 9.
pub fn mixed_traffic(pair: &Pair, port: u16) -> Mix {
    use std::io::{Read as _, Write as _};
    use std::os::fd::AsRawFd as _;
    let srv = pair.srv_v4;
    let l = Pair::in_ns(&pair.srv_ns, move || {
        std::net::TcpListener::bind((srv, port)).unwrap()
    });
    let server = thread::spawn(move || {
        for _ in 0..3 {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b).unwrap();
            s.write_all(b"pong").unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        }
    });
    let mix = Pair::in_ns(&pair.clt_ns, move || {
        let mut mix = Mix {
            graceful: Vec::new(),
            abort: 0,
            refused: Vec::new(),
        };
        for i in 0..3 {
            let (sock, local) = bound_socket(srv);
            sock.connect(&std::net::SocketAddr::new(srv, port).into())
                .unwrap();
            let mut c: std::net::TcpStream = sock.into();
            c.write_all(b"ping").unwrap();
            let mut b = [0u8; 4];
            c.read_exact(&mut b).unwrap();
            if i == 2 {
                set_linger_zero(c.as_raw_fd());
                mix.abort = local;
            } else {
                mix.graceful.push(local);
            }
        }
        for _ in 0..2 {
            let (sock, local) = bound_socket(srv);
            assert!(
                sock.connect(&std::net::SocketAddr::new(srv, 9).into())
                    .is_err()
            );
            mix.refused.push(local);
        }
        mix
    });
    server.join().unwrap();
    mix
}

/// A `flowmon run` in the client namespace, stopped with SIGTERM on drop.
pub struct Agent {
    pub child: Child,
    /// What it printed on stderr up to "answering queries".
    pub banner: String,
}

impl Agent {
    /// An agent on the pair's client side polling every 100 ms with a 200 ms
    /// linger (so tests see closes quickly), API on `sock`, plus `extra`.
    pub fn quick(pair: &Pair, sock: &str, extra: &[&str]) -> Self {
        Self::quick_under(pair, &[], sock, extra)
    }

    /// The same, started through `wrapper` (e.g. setpriv and its options).
    pub fn quick_under(pair: &Pair, wrapper: &[&str], sock: &str, extra: &[&str]) -> Self {
        let mut args = vec![
            "--iface",
            &pair.clt_if,
            "--interval",
            "100ms",
            "--linger",
            "200ms",
            "--socket",
            sock,
        ];
        args.extend_from_slice(extra);
        Self::start_under(&pair.clt_ns, wrapper, &args)
    }

    /// Starts `flowmon run ARGS` in `ns` and waits until it answers queries.
    pub fn start(ns: &str, args: &[&str]) -> Self {
        Self::start_under(ns, &[], args)
    }

    /// The same, started through `wrapper` (e.g. setpriv and its options).
    pub fn start_under(ns: &str, wrapper: &[&str], args: &[&str]) -> Self {
        let mut cmd = wrapper.to_vec();
        cmd.extend([env!("CARGO_BIN_EXE_flowmon"), "run"]);
        cmd.extend_from_slice(args);
        let (child, mut err, banner) = spawn_until(ns, &cmd, "answering queries");
        // Keep draining stderr so the agent never blocks on a full pipe.
        thread::spawn(move || {
            let mut sink = String::new();
            while err.read_line(&mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        });
        Self { child, banner }
    }

    /// Sends SIGTERM and asserts a clean exit.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let status = self.child.wait().unwrap();
        assert!(
            status.success() || thread::panicking(),
            "agent exit: {status}"
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.terminate();
        }
    }
}

/// setpriv options that run a command as nobody, with no capabilities.
pub const AS_NOBODY: [&str; 4] = [
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all",
];

/// Runs the flowmon binary to completion.
pub fn flowmon(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flowmon"))
        .args(args)
        .output()
        .unwrap()
}

/// A command's standard output, asserting it succeeded (with its stderr
/// in the failure message).
pub fn succeeded(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Rows of a `--json` answer (asserting the command succeeded).
pub fn rows(out: &std::process::Output) -> Vec<serde_json::Value> {
    succeeded(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Whether an XDP program is attached to `iface` in namespace `ns`.
pub fn xdp_attached(ns: &str, iface: &str) -> bool {
    let out = Command::new("ip")
        .args(["-n", ns, "-d", "-j", "link", "show", "dev", iface])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("\"xdp\"")
}

/// Starts `cmd ARGS` in namespace `ns` with stderr piped, and reads stderr
/// until a line contains `marker`. Returns the child, the rest of its
/// stderr, and what it printed up to the marker.
fn spawn_until(
    ns: &str,
    cmd: &[&str],
    marker: &str,
) -> (Child, BufReader<std::process::ChildStderr>, String) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", cmd[0]));
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains(marker) {
        assert!(
            err.read_line(&mut seen).unwrap() > 0,
            "{} exited before saying {marker:?}: {seen}",
            cmd[0]
        );
    }
    (child, err, seen)
}

/// Starts `tcpdump ARGS` in namespace `ns` and returns once it is listening.
pub fn tcpdump(ns: &str, args: &[&str]) -> Child {
    let mut cmd = vec!["tcpdump", "--immediate-mode", "-U", "-n"];
    cmd.extend_from_slice(args);
    // tcpdump says "listening on" once the socket is open and filtering.
    spawn_until(ns, &cmd, "listening on").0
}

/// Starts a daemon in `ns` with its output in `log`, killed on drop.
pub struct Daemon(pub Child);

impl Daemon {
    pub fn start(ns: &str, args: &[&str], log: &Path) -> Self {
        let log = std::fs::File::create(log).unwrap();
        Self(
            Command::new("ip")
                .args(["netns", "exec", ns])
                .args(args)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    /// SIGINT (tcpdump and nfcapd flush their files on it) and wait.
    pub fn stop(mut self) {
        self.interrupt();
    }

    fn interrupt(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.0.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.interrupt();
        }
    }
}

/// tshark's decoding of the IPFIX messages in `pcap`: per message, per
/// field, the values in order (a message with several records lists each
/// field's values for all of them; a biflow field has two per record).
pub fn cflow_fields(pcap: &str, fields: &[&str]) -> Vec<Vec<Vec<String>>> {
    let mut cmd = Command::new("tshark");
    cmd.args(["-r", pcap, "-d", "udp.port==4739,cflow", "-T", "fields"])
        .args(["-E", "separator=/t"]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    succeeded(&cmd.output().unwrap())
        .lines()
        .map(|line| {
            line.split('\t')
                .map(|c| {
                    c.split(',')
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// Starts tcpdump on the client namespace's loopback for IPFIX (UDP 4739).
pub fn ipfix_capture(ns: &str, path: &str) -> Daemon {
    Daemon(tcpdump(
        ns,
        &["-i", "lo", "-w", path, "udp", "port", "4739"],
    ))
}

/// An HTTP GET from inside namespace `ns`; returns the body.
pub fn http_get(ns: &str, addr: &'static str, path: String) -> Option<String> {
    Pair::in_ns(ns, move || {
        let mut s = TcpStream::connect(addr).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        let (head, body) = resp.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200")
            .then(|| body.to_string())
            .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_string()))
    })
}

/// A sample's value in Prometheus text format.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(200));
    }
}

/// The Zeek conformance data (`shared/testdata/zeek`, or `FLOWMON_TESTDATA`).
pub fn testdata() -> PathBuf {
    let dir = match std::env::var_os("FLOWMON_TESTDATA") {
        Some(d) => PathBuf::from(d),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/zeek"),
    };
    assert!(
        dir.join("traces").is_dir(),
        "Zeek conformance data not found at {}: set FLOWMON_TESTDATA",
        dir.display()
    );
    dir
}

/// The traces, as (path under traces/, file stem used by expected/ and tshark/).
pub fn traces() -> Vec<(PathBuf, String)> {
    let dir = testdata();
    let mut out: Vec<(PathBuf, String)> = std::fs::read_dir(dir.join("expected"))
        .unwrap()
        .flatten()
        .map(|e| {
            e.file_name()
                .to_string_lossy()
                .trim_end_matches(".conn.tsv")
                .to_string()
        })
        .map(|stem| {
            // "tcp_single-rst.pcap" is traces/tcp/single-rst.pcap; names
            // without a folder have no underscore-separated prefix dir.
            let path = match stem.split_once('_') {
                Some((d, f)) if dir.join("traces").join(d).is_dir() => {
                    dir.join("traces").join(d).join(f)
                }
                _ => dir.join("traces").join(&stem),
            };
            (path, stem)
        })
        .collect();
    out.sort();
    assert_eq!(out.len(), 14, "the 14 Zeek traces");
    out
}

/// The capability sets of process `pid`, as hex masks.
pub fn capability_masks(pid: u32) -> Vec<(String, u64)> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("Cap"))
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.to_string(), u64::from_str_radix(v.trim(), 16).unwrap())
        })
        .collect()
}
