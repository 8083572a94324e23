//! flowmon's performance, each figure measured side by side with its
//! baseline in the same run (machines here are noisy; ratios and differences
//! are what hold): kernel cost per packet against a do-nothing program of the
//! same type, agent poll cost with a full table, and memory per connection.
//! Run as root through `cargo xtask bench [--quick]`.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

#[path = "perf/live.rs"]
mod live;

use aya::programs::TestRunOptions;
use flowmon::{
    agent::{Agent, monotonic_ns},
    close::Timeouts,
    kernel::{Kernel, LoadOptions, Taken},
};
use flowmon_common::{
    count::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    craft::Frame,
    flow::{DEFAULT_MAX_FLOWS, FlowKey, FlowValue},
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The key of synthetic connection `i`: 10.0.0.1:80 <- 10.x.y.z:port.
fn key(i: u32) -> FlowKey {
    let mut k = FlowKey {
        port_a: 80,
        port_b: 1024 + (i % 60_000) as u16,
        family: 4,
        ifindex: 1,
        ..Default::default()
    };
    k.addr_a[..4].copy_from_slice(&[10, 0, 0, 1]);
    k.addr_b[..4].copy_from_slice(&(0x0b00_0000 + i / 60_000).to_be_bytes());
    k
}

/// Loads flowmon with `n` connections in its table (room to spare, as
/// before the array table, so the figures compare across runs).
fn loaded(n: u32) -> Kernel {
    let mut k = Kernel::load(LoadOptions {
        max_flows: n + n / 4 + 1024,
        ..LoadOptions::default()
    })
    .expect("load (run as root)");
    // Without the hand-over `flowmon run` turns on: a batch of RSTs would
    // hand its connection over at the first run, and count the rest into
    // a trailing entry, placed wherever there was room, rather than into
    // the established connection the targets are about. Each run still
    // makes the test that decides on a hand-over; the hand-over itself,
    // once a connection, is measured apart ([`new_connection_overhead`]).
    // Established and active: the agent keeps such connections in the table.
    let now = monotonic_ns();
    let mut v = FlowValue::default();
    let srv = &mut v.dir[0];
    (
        srv.synack,
        srv.packets,
        srv.data_packets,
        srv.first_ns,
        srv.first_synack_ns,
        srv.first_data_ns,
        srv.last_ns,
    ) = (1, 2, 1, now + 1, now + 1, now + 3, now + 3);
    let c = &mut v.dir[1];
    (
        c.syn,
        c.packets,
        c.data_packets,
        c.first_ns,
        c.first_syn_ns,
        c.first_ack_ns,
        c.first_data_ns,
        c.last_ns,
    ) = (1, 3, 1, now, now, now + 2, now + 2, now + 2);
    for i in 0..n {
        k.insert_flow(&key(i), &v).expect("fill the table");
    }
    k
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Nanoseconds per run of `prog` on `frame`, one batch of `repeat` runs.
fn ns_per_packet<P>(prog: &P, frame: &[u8], repeat: u32) -> f64
where
    P: for<'a> aya::programs::TestRun<
            Opts<'a> = TestRunOptions<'a>,
            Result = aya::programs::TestRunResult,
        >,
{
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        })
        .expect("test run");
    r.duration.as_nanos() as f64
}

fn frames() -> [(&'static str, &'static [u8]); 4] {
    // Connection i is 11.0.0.0:(1024 + i) -> 10.0.0.1:80. The data segment
    // belongs to connection 0, established in every table and staying so.
    // Each flag has a connection of its own: a FIN or RST on connection 0
    // would leave it closing, and its data would then take the exact clock
    // like a closing connection's packets do. Repeated, the SYN on an
    // established connection counts as a retransmission, and the FIN and RST
    // as more of the same on a closing one.
    let client = ip("11.0.0.0");
    let server = ip("10.0.0.1");
    let mk = |conn: u16, flags: u8, payload: usize| -> &'static [u8] {
        Box::leak(
            Frame::tcp(client, 1024 + conn, server, 80, flags)
                .payload(payload)
                .build()
                .into_boxed_slice(),
        )
    };
    [
        ("data", mk(0, TCP_ACK, 100)),
        ("SYN", mk(1, TCP_SYN, 0)),
        ("FIN", mk(2, TCP_FIN | TCP_ACK, 0)),
        ("RST", mk(3, TCP_RST, 0)),
    ]
}

/// Batches per program and frame in the kernel section: many short ones,
/// because this host's slow spells last longer than a batch of millions of
/// runs, and the fastest of many short batches misses them.
const ROUNDS: usize = 31;

/// SYNs that each create an entry, per table size.
const NEW_CONNECTIONS: u32 = 20_000;

/// A connection's first packet, which creates its entry. For each of
/// [`NEW_CONNECTIONS`] SYNs of connections not in the table: a run through
/// the pass-through, one through flowmon's XDP program (creating the entry),
/// and one more (the entry now there, a retransmitted SYN). A run on its own
/// starts with caches the syscall cooled, unlike the repeated batches above,
/// so the figures are medians of per-SYN differences: (first SYN minus
/// pass-through, first SYN minus the second). Then, with hand-over on as
/// `flowmon run` has it, as many connections opened by a SYN and closed by
/// an RST, which hands the connection over: the median of the RST's run
/// minus the pass-through's.
fn new_connection_overhead(k: &mut Kernel) -> (f64, f64, f64) {
    let server = ip("10.0.0.1");
    k.baselines().expect("baselines");
    let mut over = Vec::new();
    let mut creation = Vec::new();
    for i in 0..NEW_CONNECTIONS {
        let client = IpAddr::from([12, 0, (i / 50_000) as u8, 1]);
        let f = Frame::tcp(client, 1024 + (i % 50_000) as u16, server, 80, TCP_SYN).build();
        // One run each: the kernel times it on its own, and the timer's
        // overhead, the same for any program, cancels in a difference.
        let pass = ns_per_packet(k.pass_xdp(), &f, 1);
        let first = ns_per_packet(k.xdp(), &f, 1);
        let again = ns_per_packet(k.xdp(), &f, 1);
        over.push(first - pass);
        creation.push(first - again);
    }
    k.hand_over(true).expect("hand-over");
    let mut hand_over = Vec::new();
    for i in 0..NEW_CONNECTIONS {
        // Each just opened, as the table may not hold all of them at once.
        let client = IpAddr::from([13, 0, (i / 50_000) as u8, 1]);
        let port = 1024 + (i % 50_000) as u16;
        ns_per_packet(
            k.xdp(),
            &Frame::tcp(client, port, server, 80, TCP_SYN).build(),
            1,
        );
        let f = Frame::tcp(client, port, server, 80, TCP_RST | TCP_ACK).build();
        let pass = ns_per_packet(k.pass_xdp(), &f, 1);
        hand_over.push(ns_per_packet(k.xdp(), &f, 1) - pass);
    }
    k.hand_over(false).expect("hand-over off");
    let handed = k.drain_closed().len();
    assert_eq!(handed, NEW_CONNECTIONS as usize, "every RST handed over");
    (median(over), median(creation), median(hand_over))
}

fn kernel_cost(sizes: &[u32], repeat: u32) {
    println!(
        "\n## 1. Kernel cost per packet (BPF_PROG_TEST_RUN, ns, fastest of {ROUNDS} interleaved batches of {repeat} runs)\n"
    );
    println!(
        "| flows in table | XDP pass | XDP data | XDP SYN | XDP FIN | XDP RST | TC pass | TC data | TC SYN/FIN/RST avg | overhead XDP data | overhead XDP flags (avg) | overhead TC data | overhead TC flags (avg) | overhead XDP new connection, run once (cold) | of which creating the entry | overhead XDP RST handing a connection over, run once (cold) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let frames = frames();
    for &n in sizes {
        let mut k = loaded(n);
        // Rounds interleave every program and frame, and each keeps its
        // fastest batch: the host's interruptions only ever add time, and
        // interleaving spreads a slow spell over all of them alike.
        let (mut pass_x, mut pass_t) = (f64::MAX, f64::MAX);
        let (mut xdp, mut tc) = (vec![f64::MAX; frames.len()], vec![f64::MAX; frames.len()]);
        for _ in 0..ROUNDS {
            {
                let (x, t) = k.baselines().expect("baselines");
                pass_x = pass_x.min(ns_per_packet(x, frames[0].1, repeat));
                pass_t = pass_t.min(ns_per_packet(t, frames[0].1, repeat));
            }
            for (i, (_, f)) in frames.iter().enumerate() {
                xdp[i] = xdp[i].min(ns_per_packet(k.xdp(), f, repeat));
                tc[i] = tc[i].min(ns_per_packet(k.tc(), f, repeat));
            }
        }
        let flags_x = (xdp[1] + xdp[2] + xdp[3]) / 3.0;
        let flags_t = (tc[1] + tc[2] + tc[3]) / 3.0;
        let (new_conn, creation, hand_over) = new_connection_overhead(&mut k);
        println!(
            "| {n} | {pass_x:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {pass_t:.0} | {:.0} | {flags_t:.0} | **{:.1}** | **{:.1}** | **{:.1}** | **{:.1}** | {new_conn:.0} | {creation:.0} | {hand_over:.0} |",
            xdp[0],
            xdp[1],
            xdp[2],
            xdp[3],
            tc[0],
            xdp[0] - pass_x,
            flags_x - pass_x,
            tc[0] - pass_t,
            flags_t - pass_t
        );
    }
}

fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    // Safety: a plain sysconf query.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

/// A connection closed by FIN both ways at `t` (ns): what the real
/// connections of the live section leave in the table.
fn finished(t: u64) -> FlowValue {
    let mut v = FlowValue::default();
    let c = &mut v.dir[1];
    (
        c.syn,
        c.fin,
        c.packets,
        c.data_packets,
        c.first_ns,
        c.first_syn_ns,
        c.first_ack_ns,
        c.first_data_ns,
        c.first_fin_ns,
        c.last_ns,
    ) = (1, 1, 5, 1, t, t, t + 2, t + 2, t + 5, t + 7);
    let s = &mut v.dir[0];
    (
        s.synack,
        s.fin,
        s.packets,
        s.first_ns,
        s.first_synack_ns,
        s.first_fin_ns,
        s.last_ns,
    ) = (1, 1, 3, t + 1, t + 1, t + 4, t + 6);
    v
}

/// Connections closed before each poll, and polls per phase, in
/// [`agent_per_connection`].
const CLOSING: (u32, u32) = (5_000, 20);

/// CPU time this thread has used.
fn thread_cpu() -> Duration {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap();
    Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
}

/// The agent's CPU per finished connection, as `flowmon run --quiet` spends
/// it: each poll (1 s apart on a clock of its own) finds the connections
/// that closed since the last one ([`CLOSING`]), takes them, holds them
/// through the linger, reports them, and hands the result to the exporters
/// and the list of recent connections. A phase of polls from a fresh agent
/// (its tables and buffers growing, their pages first touched), then as
/// many again, measured apart (steady state).
fn agent_per_connection() -> (f64, f64) {
    let (per_poll, polls) = CLOSING;
    flowmon::agent::keep_freed_memory();
    let k = Kernel::load(LoadOptions::default()).expect("load (run as root)");
    let mut agent = Agent::new(k, Timeouts::default());
    // As `flowmon run --quiet` without IPFIX, which the live section runs.
    agent.list_changed(false);
    agent.export_held = false;
    let mut sinks = flowmon::sinks::Sinks::open(
        &flowmon::sinks::SinkConfig {
            aggregate_interval: Duration::from_secs(10),
            db: None,
            retention: Duration::from_secs(3600),
            snapshots: None,
            metrics: false,
            ipfix: None,
        },
        agent.kernel.capacity(),
        0.0,
    )
    .unwrap();
    let names = std::collections::HashMap::new();
    let start = monotonic_ns();
    let mut next = 0u32;
    let mut phase = |agent: &mut Agent, from: u32| {
        let (mut cpu, mut reported) = (Duration::ZERO, 0usize);
        for p in from..from + polls {
            let t = start + u64::from(p) * 1_000_000_000;
            for _ in 0..per_poll {
                // Distinct tuples, reused only long after their report.
                agent
                    .kernel
                    .insert_flow(&key(next % 3_000_000), &finished(t))
                    .unwrap();
                next += 1;
            }
            let before = thread_cpu();
            let r = agent
                .poll(t + 500_000_000, 1_000 * u64::from(p), &names, false)
                .unwrap();
            sinks.poll(&r, &names, t, 0, Duration::ZERO, false);
            reported += r.closed.len();
            agent.remember(r);
            cpu += thread_cpu() - before;
        }
        (cpu, reported)
    };
    let (cold, cold_reported) = phase(&mut agent, 0);
    let (steady, steady_reported) = phase(&mut agent, polls);
    assert!(steady_reported >= ((polls - 3) * per_poll) as usize);
    let per = |d: Duration, n: usize| d.as_secs_f64() * 1e6 / n as f64;
    (per(cold, cold_reported), per(steady, steady_reported))
}

/// One poll of an agent whose table (the default size) holds nothing.
fn empty_poll_ms() -> f64 {
    let k = Kernel::load(LoadOptions::default()).expect("load (run as root)");
    let mut agent = Agent::new(k, Timeouts::default());
    let names = std::collections::HashMap::new();
    median(
        (0..21)
            .map(|_| {
                let (r, d) = time(|| agent.poll(monotonic_ns(), 0, &names, false).unwrap());
                assert_eq!(r.poll.flows_active, 0);
                d.as_secs_f64() * 1e3
            })
            .collect(),
    )
}

fn agent_cost_and_memory(sizes: &[u32]) {
    println!("\n## 2. Agent cost of one poll (ms; reads median of 3, polls median of 5)\n");
    println!(
        "| flows in table | read the whole table (in place, mmap) | first poll (whole table: read, classify, deltas) | steady poll (changed + sweep slice) |"
    );
    println!("|---:|---:|---:|---:|");
    let mut memory = Vec::new();
    for &n in sizes {
        let k = loaded(n);
        // Into a buffer kept between reads, as the agent does.
        let mut buf = Vec::new();
        let read = median(
            (0..3)
                .map(|_| {
                    let (b, d) = time(|| k.flows_into(std::mem::take(&mut buf), n as usize));
                    buf = b.unwrap();
                    assert_eq!(buf.len(), n as usize);
                    d.as_secs_f64() * 1e3
                })
                .collect(),
        );
        drop(buf);
        let kernel_bytes = k.flow_table_bytes();
        let max_flows = n + n / 4 + 1024;
        // Safety: returns freed heap to the system so RSS reflects live data.
        unsafe { libc::malloc_trim(0) };
        let before = rss_bytes();
        let mut agent = Agent::new(k, Timeouts::default());
        let names = std::collections::HashMap::new();
        // The first poll reads the whole table; past 65,536 connections the
        // agent then reads what changed plus a 1/30 slice of the sweep.
        let (r, first) = time(|| agent.poll(monotonic_ns(), 0, &names, false).unwrap());
        assert_eq!(r.poll.flows_active, n as usize);
        drop(r);
        let mut polls = Vec::new();
        for _ in 0..5 {
            let (r, d) = time(|| agent.poll(monotonic_ns(), 0, &names, false).unwrap());
            assert_eq!(r.poll.flows_active, n as usize);
            polls.push(d.as_secs_f64() * 1e3);
        }
        // Safety: as above.
        unsafe { libc::malloc_trim(0) };
        let after = rss_bytes();
        println!(
            "| {n} | {read:.1} | {:.1} | **{:.1}** |",
            first.as_secs_f64() * 1e3,
            median(polls)
        );
        memory.push((
            n,
            kernel_bytes.map(|b| b as f64 / f64::from(max_flows)),
            (after.saturating_sub(before)) as f64 / f64::from(n),
        ));
        drop(agent);
    }
    let (per_poll, polls) = CLOSING;
    let (cold, steady) = agent_per_connection();
    println!(
        "\nFinished connections, {per_poll} a poll (closed by FIN both ways, held through the linger, reported, handed to the exporters), agent CPU per connection: **{steady:.2} µs** in steady state, {cold:.2} µs over a fresh agent's first {polls} polls.\n"
    );
    println!(
        "A poll with nothing in the table, sized for the default {DEFAULT_MAX_FLOWS} connections (what every poll costs before the connections it reads): **{:.3} ms** (median of 21).\n",
        empty_poll_ms()
    );
    println!(
        "\nTaking finished connections out of the table (half the table each way, one run):\n"
    );
    println!(
        "| flows in table | take program, one BPF_PROG_TEST_RUN each (µs per connection) | take program, 512 per BPF_PROG_TEST_RUN (µs per connection) |"
    );
    println!("|---:|---:|---:|");
    for &n in sizes {
        let k = loaded(n);
        let all = k.flows().unwrap();
        let (one, batched) = all.split_at(all.len() / 2);
        let (_, by_key) = time(|| {
            for (key, _) in one {
                k.take_flow(key).unwrap().unwrap();
            }
        });
        let (taken, by_batch) = time(|| k.take_flows(batched).unwrap());
        assert!(taken.iter().all(|t| matches!(t, Taken::Removed(_))));
        assert!(k.flows().unwrap().is_empty());
        let per = |d: Duration, m: usize| d.as_secs_f64() * 1e6 / m as f64;
        println!(
            "| {n} | {:.2} | **{:.2}** |",
            per(by_key, one.len()),
            per(by_batch, batched.len())
        );
    }
    println!("\n## 3. Memory per connection (bytes)\n");
    println!(
        "| flows | kernel (flow table memlock / max entries) | agent (RSS growth / tracked connections) |"
    );
    println!("|---:|---:|---:|");
    for (n, kernel, agent) in memory {
        println!(
            "| {n} | {} | **{agent:.0}** |",
            kernel.map_or("-".into(), |b| format!("{b:.0}"))
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `cargo bench` passes --bench; anything else is ignored.
    if nix::unistd::geteuid().as_raw() != 0 {
        eprintln!("perf: the benchmarks load eBPF programs: run as root (cargo xtask bench)");
        std::process::exit(77);
    }
    let (sizes, agent_sizes, repeat): (&[u32], &[u32], u32) = if quick {
        (&[1, 10_000, 100_000], &[100_000], 100_000)
    } else {
        (
            &[1, 10_000, 100_000, 1_000_000],
            &[100_000, 1_000_000],
            200_000,
        )
    };
    println!(
        "# flowmon benchmarks ({} mode), {} CPUs, kernel {}",
        if quick { "quick" } else { "full" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    // One section alone, for profiling it.
    if args.iter().any(|a| a == "--closing-only") {
        let (cold, steady) = agent_per_connection();
        println!("agent CPU per finished connection: {steady:.2} µs steady, {cold:.2} µs cold");
        println!("a poll of an empty table: {:.3} ms", empty_poll_ms());
        return;
    }
    if args.iter().any(|a| a == "--agent-only") {
        agent_cost_and_memory(agent_sizes);
        return;
    }
    if args.iter().any(|a| a == "--kernel-only") {
        kernel_cost(sizes, repeat);
        return;
    }
    let (conns, rates, real_conns): (u32, &[u32], u32) = if quick {
        (20_000, &[50_000, 0], 5_000)
    } else {
        (50_000, &[50_000, 100_000, 200_000, 0], 20_000)
    };
    let live = || live::live(conns, rates, real_conns, quick);
    if args.iter().any(|a| a == "--real-only") {
        live::live(0, &[], real_conns, quick);
        return;
    }
    if args.iter().any(|a| a == "--replay-only") {
        live::live(conns, rates, 0, quick);
        return;
    }
    if args.iter().any(|a| a == "--live-only") {
        live();
        return;
    }
    kernel_cost(sizes, repeat);
    agent_cost_and_memory(agent_sizes);
    live();
}
