//! Every monitor's kernel side sampled live, one way for all: `perf record`
//! on every CPU (the kernel's cpu-clock, kernel call chains) during a
//! monitor's warm-up, and the samples whose chain passes through that
//! monitor's own kernel code counted: flowmon's packet programs
//! (`bpf_prog_<tag>_flowmon_xdp`, `_flowmon_tc`), a packet socket's receive
//! (`tpacket_rcv`, with its filter, the copy into the ring and the reader's
//! wakeup) and the clone of each sent packet for the taps
//! (`dev_queue_xmit_nit`). Samples taken while one of the monitor's own
//! processes was on the CPU are left out: its scheduler time already counts
//! them. Where the kernel's run-time statistics time only BPF programs and
//! the live-frames test run gives the packet sockets a warm-cache floor
//! (taps), this is the same measure on both sides.

use std::{
    collections::HashSet,
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

/// The sampling period, ns of a CPU's time per sample (4,000 samples a
/// second on each CPU): a top-speed warm-up of 740,000 packets gives
/// flowmon's programs about 500 samples, pmacctd's socket about 1,200.
/// One per 50 µs perturbed what it sampled (docs/performance.md).
pub const PERIOD_NS: u64 = 250_000;

/// Whose kernel code a sample's call chain passed through.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counts {
    /// flowmon's packet programs (not its take program, which runs in
    /// the agent's process).
    pub flowmon: u64,
    /// The do-nothing XDP program.
    pub pass: u64,
    /// The packet sockets: receive and the sent packets' clone for the taps.
    pub taps: u64,
}

/// ns per packet of a kernel side sampled `samples` times over `packets`.
pub fn ns_per_packet(samples: u64, packets: u64) -> f64 {
    (samples * PERIOD_NS) as f64 / packets.max(1) as f64
}

/// A `perf record` running, started disabled and enabled through its
/// control FIFO once it is ready, so that its start-up (which reads every
/// process's maps) is not in the window.
pub struct Sampler {
    child: Child,
    data: PathBuf,
    ctl: std::fs::File,
    ack: BufReader<std::fs::File>,
}

/// Starts sampling every CPU; `None` (with a line on stderr) when perf is
/// missing or refuses.
pub fn start(dir: &Path) -> Option<Sampler> {
    let data = dir.join("sampled.data");
    let (ctl_path, ack_path) = (dir.join("perf-ctl"), dir.join("perf-ack"));
    for p in [&ctl_path, &ack_path] {
        let _ = std::fs::remove_file(p);
        nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).ok()?;
    }
    let child = Command::new("perf")
        .args(["record", "-q", "-a", "-e", "cpu-clock", "-c"])
        .arg(PERIOD_NS.to_string())
        .args(["-g", "--kernel-callchains", "-D", "-1", "--control"])
        .arg(format!(
            "fifo:{},{}",
            ctl_path.to_string_lossy(),
            ack_path.to_string_lossy()
        ))
        .arg("-o")
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| eprintln!("perf record: {e} (apt-get install linux-perf)"))
        .ok()?;
    // Opening blocks until perf opens its ends, which it does once ready.
    let ctl = std::fs::OpenOptions::new()
        .write(true)
        .open(&ctl_path)
        .ok()?;
    let ack = BufReader::new(std::fs::File::open(&ack_path).ok()?);
    let mut s = Sampler {
        child,
        data,
        ctl,
        ack,
    };
    s.command("enable").then_some(s)
}

impl Sampler {
    /// Sends `cmd` through the control FIFO and waits for perf's ack.
    fn command(&mut self, cmd: &str) -> bool {
        let mut line = String::new();
        writeln!(self.ctl, "{cmd}").is_ok()
            && self.ack.read_line(&mut line).is_ok()
            && line.trim() == "ack"
    }

    /// Stops sampling and counts, leaving out samples of `own` (pids).
    pub fn stop(mut self, own: &HashSet<u32>) -> Counts {
        self.command("disable");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        let mut script = Command::new("perf")
            .args(["script", "-F", "pid,ip,sym", "-i"])
            .arg(&self.data)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("perf script");
        let mut text = String::new();
        script
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        let _ = script.wait();
        let _ = std::fs::remove_file(&self.data);
        count(&text, own)
    }
}

/// Counts the samples of `perf script -F pid,ip,sym` output: each a line
/// with the pid, then one line per frame (`\t<ip> <symbol>`), then a
/// blank line.
pub fn count(script: &str, own: &HashSet<u32>) -> Counts {
    let mut c = Counts::default();
    let mut sample: Option<(u32, [bool; 3])> = None;
    let close = |s: Option<(u32, [bool; 3])>, c: &mut Counts| {
        if let Some((pid, hit)) = s
            && !own.contains(&pid)
        {
            c.flowmon += u64::from(hit[0]);
            c.pass += u64::from(hit[1]);
            c.taps += u64::from(hit[2]);
        }
    };
    for line in script.lines() {
        if line.trim().is_empty() {
            close(sample.take(), &mut c);
        } else if line.starts_with('\t') {
            let Some((_, hit)) = sample.as_mut() else {
                continue;
            };
            let sym = line.split_whitespace().nth(1).unwrap_or("");
            if let Some(name) = sym.strip_prefix("bpf_prog_") {
                // bpf_prog_<16 hex of the tag>_<name>
                let name = name.get(17..).unwrap_or("");
                hit[0] |= name == "flowmon_xdp" || name == "flowmon_tc";
                hit[1] |= name == "flowmon_pass_xd";
            }
            hit[2] |= matches!(sym, "tpacket_rcv" | "packet_rcv" | "dev_queue_xmit_nit");
        } else {
            close(sample.take(), &mut c);
            sample = line.trim().parse().ok().map(|pid| (pid, [false; 3]));
        }
    }
    close(sample, &mut c);
    c
}
