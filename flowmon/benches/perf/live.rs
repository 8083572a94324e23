//! Section 4: live traffic over a veth pair between two namespaces: a
//! capture of synthetic connections replayed by tcpreplay at increasing
//! rates, and real TCP connections. On the receiving side, in turn: nothing
//! (the baseline), flowmon's do-nothing XDP program alone (what the hook
//! costs), flowmon (XDP native, XDP generic, TC ingress), and the
//! libpcap-based peers tcpdump and pmacctd. For each: packets and SYN/FIN/RST
//! counted against what was sent, and the CPU the whole machine spent beyond
//! the baseline run per million packets, and the monitor's own processes'.
//! flowmon's kernel programs run in softirq context, where no process is
//! charged, which is why the whole machine's CPU is compared, and each
//! monitor's kernel side is attributed to it in a table of its own
//! (flowmon's programs' live run time, the peers' packet sockets from
//! taps).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use flowmon_common::{
    count::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    craft::Frame,
};

#[path = "sampled.rs"]
mod sampled;
#[path = "taps.rs"]
mod taps;
use taps::Tap;

const CLT_NS: &str = "fmbench-c";
const SRV_NS: &str = "fmbench-s";
const CLT_IF: &str = "fmbc";
const SRV_IF: &str = "fmbs";
/// A second pair nobody captures on, beside the first: the libpcap peers'
/// kernel side is measured against it (taps).
const TWIN_CLT_IF: &str = "fmbc2";
const TWIN_IF: &str = "fmbs2";
/// Addresses for the real connections (the replayed capture uses others,
/// which nobody has).
const CLT_ADDR: &str = "10.252.0.2";
const SRV_ADDR: &str = "10.252.0.1";

/// What the capture holds.
#[derive(Clone, Copy, Default)]
struct Sent {
    packets: u64,
    syn: u64,
    fin: u64,
    rst: u64,
}

impl Sent {
    /// Counts one TCP segment with `flags`.
    fn add(&mut self, flags: u8) {
        self.packets += 1;
        self.syn += u64::from(flags & (TCP_SYN | TCP_ACK) == TCP_SYN);
        self.fin += u64::from(flags & TCP_FIN != 0);
        self.rst += u64::from(flags & TCP_RST != 0);
    }
}

fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?}");
}

/// The CPU the monitors' processes (and the wire capture) are kept on,
/// when not `usize::MAX`: set for the real connections, whose client and
/// server have the last CPU (see [`pin_to_last_cpu`]), so that the other
/// processes' threads wake up beside them rather than preempting them.
static MONITOR_CPU: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(usize::MAX);

/// A monitor's (or the wire capture's) command, run in namespace `ns`,
/// and on [`MONITOR_CPU`] when set (its children and threads inherit that).
fn monitor_cmd(ns: &str, args: &[&str]) -> Command {
    let cpu = MONITOR_CPU.load(std::sync::atomic::Ordering::Relaxed);
    if cpu == usize::MAX {
        return in_ns(ns, args);
    }
    let cpu = cpu.to_string();
    let mut c = Command::new("taskset");
    c.args(["-c", &cpu, "ip", "netns", "exec", ns]).args(args);
    c
}

fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(args);
    c
}

/// Two namespaces joined by a veth pair; removed on drop.
struct Net;

impl Net {
    fn new() -> Self {
        for ns in [CLT_NS, SRV_NS] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
            sh(&["ip", "netns", "add", ns]);
        }
        for (c, s) in [(CLT_IF, SRV_IF), (TWIN_CLT_IF, TWIN_IF)] {
            sh(&[
                "ip", "link", "add", c, "netns", CLT_NS, "type", "veth", "peer", "name", s,
                "netns", SRV_NS,
            ]);
        }
        // The twin is set up as the first pair, but without addresses.
        for (ns, i, addr) in [
            (CLT_NS, CLT_IF, Some(CLT_ADDR)),
            (SRV_NS, SRV_IF, Some(SRV_ADDR)),
            (CLT_NS, TWIN_CLT_IF, None),
            (SRV_NS, TWIN_IF, None),
        ] {
            if let Some(addr) = addr {
                sh(&[
                    "ip",
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    i,
                ]);
                sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            }
            // Segments as they go on a wire, as in flowmon's own tests.
            sh(&[
                "ip", "netns", "exec", ns, "ethtool", "-K", i, "tso", "off", "gso", "off", "gro",
                "off",
            ]);
            sh(&["ip", "-n", ns, "link", "set", i, "up"]);
        }
        // Room for every run's connections without reusing a port.
        sh(&[
            "ip",
            "netns",
            "exec",
            CLT_NS,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_local_port_range=1024 65000",
        ]);
        Net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [CLT_NS, SRV_NS] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// `conns` connections, interleaved 64 at a time so the table holds many at
/// once: four in five close with FIN both ways (8 packets), one in five is
/// reset by the client after its data (5 packets). Addressed to a MAC and
/// network nobody has, so the receiving stack drops them after the monitors
/// have seen them and sends nothing back.
fn write_capture(path: &Path, conns: u32, srv: IpAddr) -> Sent {
    use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
    let file = std::fs::File::create(path).unwrap();
    let mut w = PcapWriter::with_header(file, PcapHeader::default()).unwrap();
    let mut sent = Sent::default();
    let mut t = 0u64;
    for block in (0..conns).collect::<Vec<_>>().chunks(64) {
        let script = |i: u32| -> Vec<(bool, u8, usize)> {
            let mut s = vec![
                (true, TCP_SYN, 0),
                (false, TCP_SYN | TCP_ACK, 0),
                (true, TCP_ACK, 0),
                (true, TCP_ACK, 100),
            ];
            if i % 5 == 4 {
                s.push((true, TCP_RST, 0));
            } else {
                s.extend([
                    (false, TCP_ACK, 0),
                    (true, TCP_FIN | TCP_ACK, 0),
                    (false, TCP_FIN | TCP_ACK, 0),
                    (true, TCP_ACK, 0),
                ]);
            }
            s
        };
        for step in 0..8 {
            for &i in block {
                let Some(&(from_client, flags, payload)) = script(i).get(step) else {
                    continue;
                };
                let clt: IpAddr = format!("10.254.{}.{}", i / 250 % 250, i % 250 + 1)
                    .parse()
                    .unwrap();
                let port = 1024 + (i / 62_500) as u16;
                let mut f = if from_client {
                    Frame::tcp(clt, port, srv, 80, flags)
                } else {
                    Frame::tcp(srv, 80, clt, port, flags)
                }
                .payload(payload)
                .build();
                f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
                t += 1000;
                w.write_packet(&PcapPacket::new(
                    Duration::from_nanos(t),
                    f.len() as u32,
                    &f,
                ))
                .unwrap();
                sent.add(flags);
            }
        }
    }
    sent
}

/// Busy and total jiffies (USER_HZ, 100 a second) of the whole machine
/// (/proc/stat "cpu").
fn cpu_jiffies() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    // user, nice, system, irq, softirq: not idle, iowait, nor steal (the
    // hypervisor running someone else), and guest is within user already.
    let busy = v[0] + v[1] + v[2] + v[5] + v[6];
    (busy, v.iter().take(8).sum())
}

/// Replays `pcap` at `pps` (0: as fast as tcpreplay can) and returns
/// (packets sent, rate achieved).
fn replay(pcap: &Path, pps: u32) -> (u64, f64) {
    let mut args = vec!["tcpreplay".to_string(), format!("--intf1={CLT_IF}")];
    if pps == 0 {
        args.push("--topspeed".into());
    } else {
        args.push(format!("--pps={pps}"));
    }
    args.push(pcap.to_string_lossy().into_owned());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = in_ns(CLT_NS, &argv).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tcpreplay: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Successful packets:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let rate = text
        .lines()
        .find(|l| l.contains("Rated:"))
        .and_then(|l| l.split(',').find(|p| p.contains("pps")))
        .and_then(|p| p.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    (sent, rate)
}

/// One monitor under test.
#[derive(Clone, Copy, PartialEq)]
enum Monitor {
    None,
    /// flowmon's do-nothing XDP program attached alone: what the XDP hook
    /// itself costs on this interface, whatever the program does.
    XdpHook,
    Flowmon,
    FlowmonGeneric,
    FlowmonTc,
    Tcpdump,
    Pmacct,
}

impl Monitor {
    fn is_flowmon(self) -> bool {
        matches!(
            self,
            Monitor::Flowmon | Monitor::FlowmonGeneric | Monitor::FlowmonTc
        )
    }

    fn name(self) -> &'static str {
        match self {
            Monitor::None => "nothing (baseline)",
            Monitor::XdpHook => "do-nothing XDP program (the hook alone)",
            Monitor::Flowmon => "flowmon (XDP native)",
            Monitor::FlowmonGeneric => "flowmon (XDP generic)",
            Monitor::FlowmonTc => "flowmon (TC ingress)",
            Monitor::Tcpdump => "tcpdump -w /dev/null (libpcap)",
            Monitor::Pmacct => "pmacctd, per-flow (libpcap)",
        }
    }
}

/// A monitor running on the receiving interface.
struct Running {
    child: Option<Child>,
    /// The do-nothing program's attachment, detached when dropped.
    hook: Option<flowmon::kernel::Kernel>,
    dir: PathBuf,
    /// Packets it had counted when the measured load started.
    before: u64,
}

fn start(m: Monitor, dir: &Path) -> Running {
    let s = |p: &str| dir.join(p).to_string_lossy().into_owned();
    let mut hook = None;
    let child = match m {
        Monitor::None => None,
        Monitor::XdpHook => {
            let k = in_ns_thread(SRV_NS, || {
                let mut k = flowmon::kernel::Kernel::load(flowmon::kernel::LoadOptions {
                    max_flows: 1024,
                    ..Default::default()
                })
                .unwrap();
                k.attach_pass_xdp(SRV_IF).unwrap();
                k
            });
            hook = Some(k);
            None
        }
        Monitor::Flowmon | Monitor::FlowmonGeneric | Monitor::FlowmonTc => {
            let sock = s("api.sock");
            // FLOWMON_BENCH_PROFILE=DIR records each agent under `perf
            // record` into DIR, for finding where its time goes (its CPU
            // figures then include perf's).
            static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let profile = std::env::var("FLOWMON_BENCH_PROFILE").ok().map(|d| {
                let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                format!("{d}/flowmon-{n}.perf")
            });
            let mut argv: Vec<&str> = Vec::new();
            if let Some(out) = &profile {
                argv.extend([
                    "perf",
                    "record",
                    "-F",
                    "2000",
                    "--call-graph",
                    "dwarf,16384",
                    "-o",
                    out,
                    "--",
                ]);
            }
            argv.extend([
                env!("CARGO_BIN_EXE_flowmon"),
                "run",
                match m {
                    Monitor::FlowmonTc => "--ingress",
                    _ => "--xdp-mode",
                },
                match m {
                    Monitor::Flowmon => "native",
                    Monitor::FlowmonGeneric => "generic",
                    _ => "tc",
                },
                "--iface",
                SRV_IF,
                "--quiet",
                "--no-history",
                "--socket",
                &sock,
            ]);
            let c = monitor_cmd(SRV_NS, &argv)
                .stderr(log(dir, "flowmon"))
                .spawn()
                .unwrap();
            wait_for_line(dir, "flowmon", "answering queries");
            Some(c)
        }
        Monitor::Tcpdump => {
            let c = monitor_cmd(
                SRV_NS,
                &[
                    "tcpdump",
                    "-i",
                    SRV_IF,
                    "-n",
                    "-s",
                    "128",
                    "-w",
                    "/dev/null",
                    "tcp",
                ],
            )
            .stderr(log(dir, "tcpdump"))
            .spawn()
            .unwrap();
            wait_for_line(dir, "tcpdump", "listening on");
            Some(c)
        }
        Monitor::Pmacct => {
            // Per-flow accounting in memory, written out when it stops (and
            // whenever its cache fills). Measured at its best: the plugin
            // pipe sized as pmacct advises for high rates, the cache left at
            // its default 16,411 entries (sized for every flow, 262,139, it
            // cost more than twice the CPU: each entry's pages are first
            // touched during the run).
            let conf = format!(
                "daemonize: false\n\
                 pcap_interface: {SRV_IF}\n\
                 aggregate: src_host, dst_host, src_port, dst_port, proto, tcpflags\n\
                 plugins: print\n\
                 print_output: csv\n\
                 print_output_file: {}\n\
                 print_refresh_time: 3600\n\
                 print_output_file_append: true\n\
                 plugin_pipe_size: 102400000\n\
                 plugin_buffer_size: 102400\n",
                s("pmacct.csv")
            );
            std::fs::write(dir.join("pmacct.conf"), conf).unwrap();
            let _ = std::fs::remove_file(dir.join("pmacct.csv"));
            let c = monitor_cmd(SRV_NS, &["pmacctd", "-f", &s("pmacct.conf")])
                .stderr(log(dir, "pmacct"))
                .stdout(log(dir, "pmacct.out"))
                .spawn()
                .unwrap();
            wait_for_line(dir, "pmacct", "link type is");
            Some(c)
        }
    };
    Running {
        child,
        hook,
        dir: dir.to_path_buf(),
        before: 0,
    }
}

/// A fresh log file for `name`'s stderr.
fn log(dir: &Path, name: &str) -> std::fs::File {
    std::fs::File::create(dir.join(format!("{name}.log"))).unwrap()
}

fn read_log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

/// Waits until `name`'s log says `marker`.
fn wait_for_line(dir: &Path, name: &str, marker: &str) {
    for _ in 0..300 {
        if read_log(dir, name).contains(marker) {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!("{name} did not say {marker:?}: {}", read_log(dir, name));
}

/// flowmon's count of TCP packets so far (its kernel counter).
fn flowmon_tcp(r: &Running) -> u64 {
    let sock = r.dir.join("api.sock").to_string_lossy().into_owned();
    let st = Command::new(env!("CARGO_BIN_EXE_flowmon"))
        .args(["status", "--socket", &sock, "--json"])
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    st["kernel"]["tcp"].as_u64().unwrap_or(0)
}

/// What a monitor counted of the measured load: packets (beyond
/// `r.before`, what the warm-up left), and SYN/FIN/RST where it counts
/// them, of the connections to `server`. `server_port` tells pmacctd's
/// client-to-server rows (with the SYN) from the others (with the
/// SYN-ACK), as it ORs a flow's flags together.
fn counted(
    m: Monitor,
    r: &mut Running,
    server: IpAddr,
    server_port: u16,
) -> (u64, Option<(u64, u64, u64)>) {
    let sock = r.dir.join("api.sock").to_string_lossy().into_owned();
    let (server, port) = (server.to_string(), server_port.to_string());
    match m {
        Monitor::None | Monitor::XdpHook => (0, None),
        Monitor::Flowmon | Monitor::FlowmonGeneric | Monitor::FlowmonTc => {
            // The counters and every connection (finished and open).
            let flows = Command::new(env!("CARGO_BIN_EXE_flowmon"))
                .args(["flows", "--socket", &sock, "--json"])
                .output()
                .unwrap();
            let (mut syn, mut fin, mut rst) = (0, 0, 0);
            for line in String::from_utf8_lossy(&flows.stdout).lines() {
                let r: serde_json::Value = serde_json::from_str(line).unwrap();
                if r["server.ip"].as_str() != Some(server.as_str())
                    || r["server.port"].as_u64() != Some(u64::from(server_port))
                {
                    continue;
                }
                let n = |k: &str| r[k].as_u64().unwrap_or(0);
                syn += n("syn.count");
                fin += n("fin.count");
                rst += n("rst.count");
            }
            (flowmon_tcp(r) - r.before, Some((syn, fin, rst)))
        }
        Monitor::Tcpdump => {
            // tcpdump prints its statistics when interrupted.
            let mut c = r.child.take().unwrap();
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
            c.wait().unwrap();
            let text = read_log(&r.dir, "tcpdump");
            let stat = |what: &str| {
                text.lines()
                    .find(|l| l.ends_with(what))
                    .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            (stat("packets captured").saturating_sub(r.before), None)
        }
        Monitor::Pmacct => {
            // It writes its flows when interrupted. It ORs the flags of a
            // flow's packets, so what it can report is the directions that
            // carried each flag; the capture sends each at most once per
            // direction, so those equal the counts sent.
            let mut c = r.child.take().unwrap();
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
            c.wait().unwrap();
            let text = std::fs::read_to_string(r.dir.join("pmacct.csv")).unwrap_or_default();
            let (mut packets, mut syn, mut fin, mut rst) = (0, 0, 0, 0);
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split(',').collect();
                if f.len() < 8 || f[5] != "tcp" {
                    continue;
                }
                let ours = [f[0], f[1]].contains(&server.as_str())
                    && [f[2], f[3]].contains(&port.as_str());
                if !ours {
                    continue;
                }
                let flags: u8 = f[4].parse().unwrap_or(0);
                packets += f[6].parse::<u64>().unwrap_or(0);
                let to_server = f[3].parse::<u16>() == Ok(server_port);
                syn += u64::from(to_server && flags & TCP_SYN != 0);
                fin += u64::from(flags & TCP_FIN != 0);
                rst += u64::from(flags & TCP_RST != 0);
            }
            (packets, Some((syn, fin, rst)))
        }
    }
}

/// User and system CPU seconds of process `pid` and its descendants so far
/// (pmacctd runs its plugins as child processes).
fn tree_cpu(pid: u32) -> f64 {
    tree(pid).into_iter().map(process_cpu).sum()
}

/// Process `pid` and its descendants.
fn tree(pid: u32) -> std::collections::HashSet<u32> {
    let mut parent = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let s = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let ppid = s
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
        if let Some(pp) = ppid {
            parent.insert(p, pp);
        }
    }
    let descends = |mut p: u32| {
        while p > 1 {
            if p == pid {
                return true;
            }
            p = parent.get(&p).copied().unwrap_or(0);
        }
        false
    };
    parent.keys().copied().filter(|&p| descends(p)).collect()
}

/// CPU seconds process `pid` has run so far, all its threads: the
/// scheduler's nanosecond count (`/proc/PID/task/TID/schedstat`), where the
/// user and system times of `/proc/PID/stat` tick in 10 ms steps, too coarse
/// for a run that costs the agent a tenth of a second.
fn process_cpu(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum::<u64>() as f64
        / 1e9
}

fn stop(mut r: Running) {
    // Detaches the do-nothing program.
    drop(r.hook.take());
    if let Some(c) = r.child.as_mut() {
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = c.wait();
    }
}

/// What one run of a workload put on the wire.
struct Load {
    sent: Sent,
    /// Packets per second achieved.
    rate: f64,
    /// The address and port the connections went to.
    server: IpAddr,
    server_port: u16,
}

/// What one monitor's run of a workload gave.
struct Sample {
    rate: f64,
    sent: Sent,
    got: u64,
    flags: Option<(u64, u64, u64)>,
    /// The whole machine's busy seconds during the load and the settle.
    busy: f64,
    /// The monitor's own processes' CPU seconds over the same time (none
    /// for the hook alone).
    own: Option<f64>,
    /// flowmon's packet programs during the warm-up: run time (ns) and
    /// runs of each of [`PROGRAMS`], from the kernel's statistics. They run
    /// in softirq context, charged to no process.
    programs: Option<Runs>,
    /// Every monitor's kernel side sampled during the warm-up (sampled),
    /// and the packets the warm-up sent.
    sampled: Option<(sampled::Counts, u64)>,
}

impl Sample {
    /// `seconds` of CPU over this run, per million packets sent.
    fn per_mpkt(&self, seconds: f64) -> f64 {
        seconds / (self.sent.packets as f64 / 1e6)
    }
}

const MONITORS: [Monitor; 7] = [
    Monitor::None,
    Monitor::XdpHook,
    Monitor::Flowmon,
    Monitor::FlowmonGeneric,
    Monitor::FlowmonTc,
    Monitor::Tcpdump,
    Monitor::Pmacct,
];

/// Runs `load` `rounds` times with each monitor in turn (a round runs every
/// monitor once, so a slow spell of the host spreads over all of them) and
/// prints a row for each: counts summed over the rounds, the rate and the
/// CPU figures the medians of the rounds', each round's whole-machine
/// figure taken beyond that round's baseline. `label` names the rate
/// column. With `warm_up` (other connections, sent by the closure, which
/// returns the packets it sent), each monitor first sees those, unmeasured,
/// and is given the linger and a poll to finish with them: what is measured is then a monitor in its
/// steady state (tables and queues grown, pages touched), as a monitor runs
/// for days.
fn compare(
    dir: &Path,
    label: &str,
    mut warm_up: Option<&mut dyn FnMut() -> u64>,
    rounds: usize,
    taps: &[Tap],
    mut load: impl FnMut(Monitor) -> Load,
) -> Vec<String> {
    let mut samples: Vec<Vec<Sample>> = (0..MONITORS.len()).map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, &m) in MONITORS.iter().enumerate() {
            let warm_up = warm_up
                .as_mut()
                .map(|w| &mut **w as &mut dyn FnMut() -> u64);
            samples[i].push(measure(m, dir, warm_up, &mut load));
        }
    }
    let median = super::median;
    let programs = programs_rows(label, &samples, taps);
    for (i, &m) in MONITORS.iter().enumerate() {
        let runs = &samples[i];
        let sum = |f: &dyn Fn(&Sample) -> u64| runs.iter().map(f).sum::<u64>();
        let sent = Sent {
            packets: sum(&|s| s.sent.packets),
            syn: sum(&|s| s.sent.syn),
            fin: sum(&|s| s.sent.fin),
            rst: sum(&|s| s.sent.rst),
        };
        let per_mpkt = |f: &dyn Fn(usize, &Sample) -> f64| {
            let v = runs.iter().enumerate().map(|(r, s)| s.per_mpkt(f(r, s)));
            format!("{:.2}", median(v.collect()))
        };
        let whole = if m == Monitor::None {
            "-".to_string()
        } else {
            // MONITORS[0] is the baseline, run first in every round.
            per_mpkt(&|r, s| (s.busy - samples[0][r].busy).max(0.0))
        };
        let own = if runs[0].own.is_none() {
            "-".to_string()
        } else {
            per_mpkt(&|_, s| s.own.unwrap_or(0.0))
        };
        let flags = runs[0].flags.map(|_| {
            let f = |k: usize| {
                runs.iter()
                    .map(|s| s.flags.map_or(0, |t| [t.0, t.1, t.2][k]))
                    .sum::<u64>()
            };
            (f(0), f(1), f(2))
        });
        println!(
            "| {label} | {} | {:.0} | {} | {} | {whole} | {own} |",
            m.name(),
            median(runs.iter().map(|s| s.rate).collect()),
            if matches!(m, Monitor::None | Monitor::XdpHook) {
                "-".into()
            } else {
                format!("{} / {}", sum(&|s| s.got), sent.packets)
            },
            flags.map_or("-".into(), |(s, f, x)| format!(
                "{s}, {f}, {x} / {}, {}, {}",
                sent.syn, sent.fin, sent.rst
            )),
        );
    }
    programs
}

/// The rows of [`print_programs`] for one load, each monitor's CPU per
/// packet with its kernel side attributed, two ways (medians over the
/// rounds):
/// - flowmon's programs' run time per packet from the kernel's statistics
///   during the warm-ups, beyond the do-nothing program's (whose own
///   figure is what the statistics cost, two clock reads a run, ~50 ns in
///   this VM, not the hook's), each program per run of its own; the
///   libpcap peers' packet sockets from `taps`, a floor;
/// - every monitor's kernel side sampled in the same warm-ups (sampled),
///   the peers' beyond the baseline row's in the same round (the real
///   connections' own capture, on the client's veth, is a packet socket
///   too).
///
/// And pmacctd's figure over each row's, by each way.
fn programs_rows(label: &str, samples: &[Vec<Sample>], taps: &[Tap]) -> Vec<String> {
    let median = super::median;
    let ns = |s: &Sample| {
        s.programs.map_or(0.0, |r| {
            let (t, n) = total(&r);
            t as f64 / n.max(1) as f64
        })
    };
    let measured = |runs: &[Sample]| {
        runs.iter()
            .all(|s| s.programs.is_some_and(|r| total(&r).1 > 0))
    };
    let floor = MONITORS
        .iter()
        .position(|&m| m == Monitor::XdpHook)
        .filter(|&i| measured(&samples[i]))
        .map_or(0.0, |i| median(samples[i].iter().map(ns).collect()));
    let own = |s: &Sample| s.per_mpkt(s.own.unwrap_or(0.0));
    // MONITORS[0] is the baseline, run first in every round.
    let sampled_ns = |m: Monitor, r: usize, s: &Sample| {
        let (c, packets) = s.sampled?;
        let of = match m {
            Monitor::None => return None,
            Monitor::XdpHook => c.pass,
            m if m.is_flowmon() => c.flowmon,
            _ => c
                .taps
                .saturating_sub(samples[0][r].sampled.map_or(0, |b| b.0.taps)),
        };
        Some(sampled::ns_per_packet(of, packets))
    };
    // Per monitor: (statistics or floor, sampled) attributed, s per Mpkt.
    let attributed: Vec<(Option<f64>, Option<f64>)> = MONITORS
        .iter()
        .enumerate()
        .map(|(i, &m)| {
            let runs = &samples[i];
            if matches!(m, Monitor::None | Monitor::XdpHook) {
                return (None, None);
            }
            let by_stats = if let Some(tap) = taps.iter().find(|t| t.monitor == m) {
                // A packet crosses the tap once: 1 ns per packet is 0.001 s per Mpkt.
                Some(median(runs.iter().map(own).collect()) + tap.ns() / 1000.0)
            } else {
                measured(runs).then(|| {
                    median(
                        runs.iter()
                            .map(|s| own(s) + (ns(s) - floor).max(0.0) / 1000.0)
                            .collect(),
                    )
                })
            };
            let v: Option<Vec<f64>> = runs
                .iter()
                .enumerate()
                .map(|(r, s)| Some(own(s) + sampled_ns(m, r, s)? / 1000.0))
                .collect();
            (by_stats, v.map(median))
        })
        .collect();
    let pmacct = MONITORS.iter().position(|&m| m == Monitor::Pmacct).unwrap();
    let ratio = |of: Option<f64>, peer: Option<f64>| match (of, peer) {
        (Some(a), Some(p)) if a > 0.0 => format!("{:.1}", p / a),
        _ => "-".into(),
    };
    let cell = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
    let mut rows = Vec::new();
    for (i, &m) in MONITORS.iter().enumerate() {
        let runs = &samples[i];
        if m == Monitor::None {
            continue;
        }
        let sampled: Option<Vec<f64>> = runs
            .iter()
            .enumerate()
            .map(|(r, s)| sampled_ns(m, r, s))
            .collect();
        let sampled = cell(sampled.map(median), 0);
        let (by_stats, by_sampling) = attributed[i];
        let ratios = if m.is_flowmon() {
            format!(
                "{} | {}",
                ratio(by_stats, attributed[pmacct].0),
                ratio(by_sampling, attributed[pmacct].1)
            )
        } else {
            "- | -".into()
        };
        let (runs_total, stats_ns, by_program) =
            if let Some(tap) = taps.iter().find(|t| t.monitor == m) {
                ("-".into(), format!("{:.0} (floor)", tap.ns()), "-".into())
            } else if measured(runs) {
                let runs_total = runs
                    .iter()
                    .map(|s| s.programs.map_or(0, |r| total(&r).1))
                    .sum::<u64>();
                // Each program apart (medians): the one that sees a
                // connection's first packet makes its entry, the first touch
                // of a bucket's lines, and costs several times the other
                // (docs/performance.md).
                let by_program = PROGRAMS[..2]
                    .iter()
                    .enumerate()
                    .filter_map(|(p, name)| {
                        let per = |s: &Sample| s.programs.map(|r| r[p]).filter(|&(_, n)| n > 0);
                        runs.iter().all(|s| per(s).is_some()).then(|| {
                            let v = runs
                                .iter()
                                .filter_map(per)
                                .map(|(t, n)| t as f64 / n as f64);
                            format!("{name} {:.0}", median(v.collect()))
                        })
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                let by_program = if by_program.is_empty() {
                    "-".into()
                } else {
                    by_program
                };
                (
                    runs_total.to_string(),
                    format!("{:.0}", median(runs.iter().map(ns).collect())),
                    by_program,
                )
            } else {
                ("-".into(), "-".into(), "-".into())
            };
        let processes = runs[0].own.map(|_| median(runs.iter().map(own).collect()));
        rows.push(format!(
            "| {label} | {} | {runs_total} | {stats_ns} | {by_program} | {} | {} | {sampled} | {} | {ratios} |",
            m.name(),
            cell(processes, 2),
            cell(by_stats, 2),
            cell(by_sampling, 2),
        ));
    }
    rows
}

/// The table of each monitor's kernel side, attributed, measured during
/// the warm-ups (rows from [`compare`]).
fn print_programs(rows: &[String]) {
    if rows.is_empty() {
        return;
    }
    println!(
        "\nCPU per packet, attributed: each monitor's processes (as above) and its kernel side, which no process is charged with, measured during each warm-up (the same load, unmeasured), two ways. (1) flowmon: its programs' run time in the live path, from the kernel's run-time statistics (`BPF_ENABLE_STATS`, on during the warm-ups only, as they time every run); the do-nothing program's figure is what the statistics themselves cost per run, taken off flowmon's. The libpcap peers: their packet socket's cost per received packet from the live-frames table above, a floor (warm caches, repeated frames). (2) Sampled, the same way for every monitor: `perf record` on every CPU (cpu-clock, one sample per {} µs of a CPU's time, kernel call chains), the samples whose chain passes through the monitor's kernel code (flowmon: its packet programs; the peers: `tpacket_rcv`, `packet_rcv` and `dev_queue_xmit_nit`, beyond the baseline row's), leaving out those taken while the monitor's own processes ran, which their CPU time counts already.\n\n| warm-ups of the row | monitor | program runs (warm-ups) | (1) ns per packet, kernel side (flowmon: with the statistics) | (1) each program, ns per run (with the statistics) | its processes, s per Mpkt | (1) processes + kernel side (flowmon: beyond the statistics), s per Mpkt | (2) ns per packet, kernel side, sampled | (2) processes + kernel side, s per Mpkt | pmacctd ÷ this, (1) | pmacctd ÷ this, (2) |\n|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        sampled::PERIOD_NS / 1000
    );
    for r in rows {
        println!("{r}");
    }
}

/// One run of `load` with monitor `m`.
fn measure(
    m: Monitor,
    dir: &Path,
    warm_up: Option<&mut dyn FnMut() -> u64>,
    load: &mut impl FnMut(Monitor) -> Load,
) -> Sample {
    let mut r = start(m, dir);
    let mut programs = None;
    let mut sampled = None;
    if let Some(warm_up) = warm_up {
        // The kernel's run-time statistics of flowmon's programs, on only
        // during the warm-up (the same load, unmeasured): they time every
        // run, which would add to the measured rows.
        let stats = (m.is_flowmon() || m == Monitor::XdpHook)
            .then(|| aya::sys::enable_stats(aya::sys::Stats::RunTime).ok())
            .flatten();
        let before = stats.as_ref().map(|_| program_runs());
        // Every CPU sampled as well: the statistics' clock reads are
        // outside the programs' frames, so they do not add to these.
        let sampler = sampled::start(dir);
        let packets = warm_up();
        let own = r.child.as_ref().map(|c| tree(c.id())).unwrap_or_default();
        sampled = sampler.map(|s| (s.stop(&own), packets));
        programs = before.map(|r0| {
            let r = program_runs();
            std::array::from_fn(|p| {
                (
                    r[p].0.saturating_sub(r0[p].0),
                    r[p].1.saturating_sub(r0[p].1),
                )
            })
        });
        drop(stats);
        thread::sleep(SETTLE);
        r.before = match m {
            m if m.is_flowmon() => flowmon_tcp(&r),
            Monitor::Tcpdump => packets,
            _ => 0,
        };
    }
    let pid = r.child.as_ref().map(Child::id);
    let cpu0 = pid.map_or(0.0, tree_cpu);
    let before = cpu_jiffies();
    let Load {
        sent,
        rate,
        server,
        server_port,
    } = load(m);
    // The same settling time for every monitor, in which flowmon's agent
    // reports the last connections. Measured before the counts are read,
    // since reading them (a query) costs CPU too.
    thread::sleep(SETTLE);
    let busy = (cpu_jiffies().0 - before.0) as f64 / 100.0;
    let own = pid.map(|p| tree_cpu(p) - cpu0);
    let (got, flags) = counted(m, &mut r, server, server_port);
    stop(r);
    Sample {
        rate,
        sent,
        got,
        flags,
        busy,
        own,
        programs,
        sampled,
    }
}

/// How long after a load (measured or warm-up) a monitor is left to
/// finish with it: flowmon's agent reports a finished connection once it
/// has been silent for the linger (2 s), at the first poll (1 s apart)
/// after that, so the last connections of a load are reported up to 3 s
/// after it. With 1.5 s, most of a top-speed replay's reports fell after
/// the measured window: the agent's CPU per packet came to 121-145 ns
/// measured so, against 210-223 with 4 s (alternating runs of the same
/// build, docs/performance.md). pmacctd and tcpdump do their work as
/// packets arrive.
const SETTLE: Duration = Duration::from_millis(3500);

/// flowmon's packet programs, then the do-nothing XDP program (last, so
/// that `PROGRAMS[..2]` are flowmon's), as the kernel names them: it keeps
/// 15 characters, `flowmon_pass_xdp` is `flowmon_pass_xd`.
const PROGRAMS: [&str; 3] = ["flowmon_xdp", "flowmon_tc", "flowmon_pass_xd"];

/// Run time (ns) and runs of each of [`PROGRAMS`].
type Runs = [(u64, u64); 3];

fn total(r: &Runs) -> (u64, u64) {
    r.iter().fold((0, 0), |(t, n), p| (t + p.0, n + p.1))
}

/// [`Runs`] now, each summed over every loaded copy (the benchmark
/// attaches one monitor at a time).
fn program_runs() -> Runs {
    let mut r = Runs::default();
    for p in aya::programs::loaded_programs().filter_map(Result::ok) {
        if let Some(i) = PROGRAMS.iter().position(|&n| Some(n) == p.name_as_str()) {
            r[i].0 += p.run_time().as_nanos() as u64;
            r[i].1 += p.run_count();
        }
    }
    r
}

const TABLE_HEAD: &str = "| rate | monitor | rate achieved (pps) | packets counted / sent | SYN, FIN, RST counted / sent | CPU s per Mpkt beyond baseline (whole machine) | of which its processes |\n|---:|---|---:|---|---|---:|---:|";

/// The live section: the replayed capture at each of `rates` (none: left
/// out), then `real_conns` real connections per run (0: left out).
pub fn live(conns: u32, rates: &[u32], real_conns: u32, quick: bool) {
    println!("\n## 4. Live traffic against libpcap peers (over a veth pair)\n");
    let net = Net::new();
    let dir = tempfile::tempdir().unwrap();
    let taps = taps::measure(
        dir.path(),
        &[Monitor::Tcpdump, Monitor::Pmacct],
        if quick { 11 } else { 31 },
    );
    if !rates.is_empty() {
        replayed(dir.path(), conns, rates, quick, &taps);
    }
    if real_conns > 0 {
        real(dir.path(), real_conns, quick, &taps);
    }
    drop(net);
}

/// Rounds of the replay at top speed in the full run (one at a fixed rate):
/// at top speed, tcpreplay spins while the veth is backed up, so a run's
/// whole-machine figure is as much its length as the monitor's work, and
/// the top rate of one run with the same monitor moved by a third from one
/// full run to the next.
const TOP_SPEED_ROUNDS: usize = 3;

/// The replayed capture of `conns` synthetic connections, at each of `rates`
/// (0: top speed).
fn replayed(dir: &Path, conns: u32, rates: &[u32], quick: bool, taps: &[Tap]) {
    let pcap = dir.join("synthetic.pcap");
    let server: IpAddr = "10.253.0.1".parse().unwrap();
    let sent = write_capture(&pcap, conns, server);
    // Connections of the same kind to another server, to warm each monitor
    // up with ([`WARM_UP`]).
    let warm_up = dir.join("warm-up.pcap");
    let warm_conns = conns.max(WARM_UP);
    write_capture(&warm_up, warm_conns, "10.253.0.2".parse().unwrap());
    println!(
        "### Replayed capture (tcpreplay)\n\n{conns} connections, {} packets per replay: SYN {}, FIN {}, RST {}. Each monitor first sees {warm_conns} connections of the same kind to another server at top speed, unmeasured (as many as flowmon's agent keeps for queries, `--keep`, so that its queue of them is full), then the linger passes (steady state). {}\n",
        sent.packets,
        sent.syn,
        sent.fin,
        sent.rst,
        if quick {
            "One run per row.".to_string()
        } else {
            format!(
                "One run per row at a fixed rate; at top speed {TOP_SPEED_ROUNDS} rounds of every monitor, counts summed, rate and CPU the medians."
            )
        }
    );
    println!("{TABLE_HEAD}");
    let mut programs = Vec::new();
    for &pps in rates {
        let label = if pps == 0 {
            "max".to_string()
        } else {
            format!("{pps} pps")
        };
        let rounds = if pps == 0 && !quick {
            TOP_SPEED_ROUNDS
        } else {
            1
        };
        programs.extend(compare(
            dir,
            &label,
            Some(&mut || replay(&warm_up, 0).0),
            rounds,
            taps,
            |_| {
                let (packets, rate) = replay(&pcap, pps);
                Load {
                    sent: Sent { packets, ..sent },
                    rate,
                    server,
                    server_port: 80,
                }
            },
        ));
    }
    print_programs(&programs);
}

/// `real_conns` real TCP connections per run, rounds of every monitor.
fn real(dir: &Path, real_conns: u32, quick: bool, taps: &[Tap]) {
    println!(
        "\n### Real TCP connections\n\n{real_conns} connections per run, one after another as fast as one client thread opens them: the client sends 100 bytes, the server reads them and closes, the client closes. What was sent is read from a capture on the client's side. As with the replay, each monitor is first warmed up, unmeasured, then the linger passes (steady state): here with {WARM_UP} connections to other ports, as many as flowmon's agent keeps for queries (`--keep`), so that its queue of them is full.\n"
    );
    println!("{TABLE_HEAD}");
    // A listening port of its own per run, warm-up or measured: no tuple
    // from an earlier run lingers in TIME_WAIT, and what a monitor counted
    // of the warm-up is told apart by the port.
    let port = std::cell::Cell::new(8000u16);
    let next_port = || {
        port.set(port.get() + 1);
        port.get()
    };
    MONITOR_CPU.store(0, std::sync::atomic::Ordering::Relaxed);
    let programs = compare(
        dir,
        "max",
        Some(&mut || warm_up_real(dir, &next_port)),
        if quick { 1 } else { REAL_ROUNDS },
        taps,
        |_| real_connections(dir, real_conns, next_port()),
    );
    print_programs(&programs);
    MONITOR_CPU.store(usize::MAX, std::sync::atomic::Ordering::Relaxed);
}

/// Opens `n` TCP connections from the client namespace to a server in the
/// server namespace on `port`, and returns what the wire carried (a capture
/// on the client's veth) and the packet rate.
fn real_connections(dir: &Path, n: u32, port: u16) -> Load {
    let (sent, elapsed) = captured(dir, || connect_loop(n, port));
    Load {
        rate: sent.packets as f64 / elapsed.as_secs_f64(),
        sent,
        server: SRV_ADDR.parse().unwrap(),
        server_port: port,
    }
}

/// Runs `send` with a capture on the client's veth, and returns what the
/// capture counted and how long `send` took.
fn captured(dir: &Path, send: impl FnOnce()) -> (Sent, Duration) {
    let wire = dir.join("wire.pcap");
    let mut capture = monitor_cmd(
        CLT_NS,
        &[
            "tcpdump",
            "-i",
            CLT_IF,
            "-n",
            "-B",
            "65536",
            // Not --immediate-mode, which woke it for every packet, beside
            // the connections, and moved their rate by a fifth from run to
            // run: it reads a block at a time, and the last, partly filled
            // block is handed over by the block timeout (below).
            "-U",
            "-w",
            &wire.to_string_lossy(),
            "tcp",
        ],
    )
    .stderr(log(dir, "wire"))
    .spawn()
    .unwrap();
    wait_for_line(dir, "wire", "listening on");
    let started = std::time::Instant::now();
    send();
    let elapsed = started.elapsed();
    // The last FIN's ACK, and the kernel's timeout for the capture's last
    // block (tcpdump's packet buffer timeout, 1 s), then the capture's end.
    thread::sleep(Duration::from_millis(1300));
    let pid = nix::unistd::Pid::from_raw(capture.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    capture.wait().unwrap();
    (count_capture(&wire), elapsed)
}

/// Opens `n` TCP connections, one after another, from a client thread in
/// the client namespace to a server thread in the server namespace on
/// `port`: the client sends 100 bytes, the server reads them and closes,
/// the client closes.
fn connect_loop(n: u32, port: u16) {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
    };
    let listener = in_ns_thread(SRV_NS, move || TcpListener::bind((SRV_ADDR, port)).unwrap());
    let server = thread::spawn(move || {
        pin_to_last_cpu();
        let mut buf = [0u8; 100];
        for _ in 0..n {
            let (mut s, _) = listener.accept().unwrap();
            s.read_exact(&mut buf).unwrap();
        }
    });
    in_ns_thread(CLT_NS, move || {
        pin_to_last_cpu();
        let mut buf = [0u8; 1];
        for _ in 0..n {
            let mut s = TcpStream::connect((SRV_ADDR, port)).unwrap();
            s.write_all(&[7u8; 100]).unwrap();
            // The server's FIN; then ours.
            assert_eq!(s.read(&mut buf).unwrap(), 0);
        }
    });
    server.join().unwrap();
}

/// Connections a monitor is warmed up with before the real connections (and,
/// replayed, before the capture) are measured: as many as flowmon's agent
/// keeps for queries (`--keep`), so that its queue of recent connections is
/// full, and what it frees each poll is what it allocates, as in a monitor
/// that has run for a while. With only as many as a measured run, the queue
/// was still growing into fresh pages during the measurement. The real ones
/// in runs of at most 20,000 on ports of their own, fewer than the client's
/// ephemeral ports: no tuple is reused while the server still holds it in
/// TIME_WAIT.
const WARM_UP: u32 = 100_000;

fn warm_up_real(dir: &Path, next_port: &dyn Fn() -> u16) -> u64 {
    let (sent, _) = captured(dir, || {
        let mut left = WARM_UP;
        while left > 0 {
            let n = left.min(20_000);
            connect_loop(n, next_port());
            left -= n;
        }
    });
    sent.packets
}

/// Runs of the real connections per monitor: their rates vary more from
/// run to run than the replay's, so the table shows medians.
const REAL_ROUNDS: usize = 5;

/// Keeps the calling thread on the machine's last CPU. The real
/// connections' client and server both run there, and so does the kernel's
/// work for their packets (veth delivers on the sending CPU): that CPU is
/// busy for the whole run, and whatever a monitor adds to a packet's path
/// lengthens the run by exactly that, while the monitors' own processes
/// take the other CPU. Left to the scheduler, the two threads ping-ponged
/// between the CPUs or shared one depending on what else ran, which moved
/// the rate by half from run to run.
fn pin_to_last_cpu() {
    use nix::sched::{CpuSet, sched_setaffinity};
    let last = thread::available_parallelism().map_or(1, |n| n.get()) - 1;
    let mut set = CpuSet::new();
    set.set(last).unwrap();
    sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
}

/// Runs `f` on a thread inside namespace `ns`; sockets it makes stay there.
fn in_ns_thread<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::os::fd::AsFd as _;
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// Packets and SYN (without ACK), FIN and RST segments in a capture.
fn count_capture(path: &Path) -> Sent {
    use flowmon_common::parse::{Parsed, TcpSegment, parse_ethernet};
    use pcap_file::pcap::PcapReader;
    let mut r = PcapReader::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut sent = Sent::default();
    while let Some(p) = r.next_packet() {
        let p = p.unwrap();
        let mut seg = TcpSegment::default();
        if parse_ethernet(&p.data[..], 0, &mut seg) != Parsed::Tcp {
            continue;
        }
        let flags = seg.flags as u8;
        sent.add(flags);
    }
    sent
}
