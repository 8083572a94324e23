//! The libpcap peers' kernel side per packet: what a packet socket on the
//! receiving veth adds to each received packet (the delivery to the tap,
//! `tpacket_rcv`'s filter, copy into the ring and wakeup), which no process
//! is charged with, as flowmon's programs are not. Measured the way
//! section 1 measures flowmon's programs: `BPF_PROG_TEST_RUN` of the
//! do-nothing XDP program in live-frames mode, whose frames it passes into
//! the stack as the veth's received packets, on the veth the peer captures
//! on and on a twin veth nobody captures on, batches interleaved, fastest
//! of each. Frames repeat and caches stay warm, so it is a floor: the
//! peers' live kernel side, like flowmon's programs' live run time, is
//! more. (This VM refuses fentry and kprobes, which would time the
//! peers' live calls as the kernel's statistics time flowmon's programs.)

use flowmon_common::{count::TCP_ACK, craft::Frame};

use super::{Monitor, SRV_IF, SRV_NS, TWIN_IF, in_ns_thread, start, stop};

/// Frames handed to the stack together (as a NAPI poll's 64), and frames
/// a batch (the test run's `repeat`, which counts frames in this mode).
const FRAMES_TOGETHER: u32 = 64;
const FRAMES_PER_BATCH: u32 = 20_000;

/// One peer's figures, ns per packet: the fastest batch on its veth and on
/// the twin, and the difference.
#[derive(Clone, Copy)]
pub struct Tap {
    pub monitor: Monitor,
    pub tapped: f64,
    pub bare: f64,
}

impl Tap {
    pub fn ns(&self) -> f64 {
        (self.tapped - self.bare).max(0.0)
    }
}

/// Measures each of `peers` in turn, started for it alone, over `batches`
/// interleaved batches on each veth, and prints the table.
pub fn measure(dir: &std::path::Path, peers: &[Monitor], batches: usize) -> Vec<Tap> {
    println!(
        "### The libpcap peers' kernel side (BPF_PROG_TEST_RUN, live frames)\n\nEach peer captures on the receiving veth; the do-nothing XDP program passes one data segment (to a MAC and network nobody has, as the replay's), {FRAMES_TOGETHER} frames at a time, into the stack as that veth's received packets, and as a twin veth's nobody captures on: {batches} interleaved batches of {FRAMES_PER_BATCH} frames on each, the fastest of each. The difference is what the peer's packet socket adds to a received packet: a floor, with frames repeated and caches warm.\n\n| peer | ns per packet, its veth | ns per packet, the twin | its kernel side, ns per packet |\n|---|---:|---:|---:|"
    );
    let mut taps = Vec::new();
    for &m in peers {
        let running = start(m, dir);
        let (tapped, bare) = in_ns_thread(SRV_NS, move || fastest(batches));
        stop(running);
        let tap = Tap {
            monitor: m,
            tapped,
            bare,
        };
        println!(
            "| {} | {tapped:.0} | {bare:.0} | **{:.0}** |",
            m.name(),
            tap.ns()
        );
        taps.push(tap);
    }
    println!();
    taps
}

/// The fastest batch on each veth, ns per packet (run in the server's
/// namespace, where the test run finds the veths by index).
fn fastest(batches: usize) -> (f64, f64) {
    let mut k = flowmon::kernel::Kernel::load(flowmon::kernel::LoadOptions {
        max_flows: 1024,
        ..Default::default()
    })
    .expect("loading flowmon's programs");
    k.baselines().expect("loading the do-nothing programs");
    let index = |name: &str| nix::net::if_::if_nametoindex(name).expect(name);
    let (tapped, twin) = (index(SRV_IF), index(TWIN_IF));
    let frame = Frame::tcp(
        "10.254.0.1".parse().unwrap(),
        1024,
        "10.253.0.9".parse().unwrap(),
        80,
        TCP_ACK,
    )
    .payload(100)
    .build();
    let run = |ifindex: u32| -> f64 {
        use aya::programs::{TestRun as _, TestRunAttrs, TestRunOptions};
        // struct xdp_md: data 0, data_end the frame's length, the
        // receiving device; the rest 0.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let r = k
            .pass_xdp()
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                ctx_in: Some(&ctx),
                repeat: FRAMES_PER_BATCH,
                attrs: TestRunAttrs::new().xdp_live_frames(FRAMES_TOGETHER),
                ..Default::default()
            })
            .expect("a live-frames test run");
        // The kernel's mean per frame.
        r.duration.as_nanos() as f64
    };
    let (mut a, mut b) = (f64::MAX, f64::MAX);
    for _ in 0..batches {
        a = a.min(run(tapped));
        b = b.min(run(twin));
    }
    (a, b)
}
