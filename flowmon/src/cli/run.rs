//! `flowmon run`: load, attach, poll the maps every interval, print a summary.

use std::{
    io::{self, Write as _},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use std::{net::SocketAddr, path::PathBuf};

use flowmon::{
    agent::{self, Agent},
    api::{self, Reply},
    caps,
    close::Timeouts,
    http, iface, ipfix,
    kernel::{self, Kernel, LoadOptions, XdpAttach},
    record::ConnRecord,
    services::Services,
    sinks::{SinkConfig, Sinks},
    snapshot,
    status::{self, Status},
    store,
    summary::{self, Clock},
    views::{self, Response, View},
};

use super::timeouts::TimeoutArgs;
use flowmon_common::flow::DEFAULT_MAX_FLOWS;
use tokio::signal::unix::{SignalKind, signal};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Interface to watch (repeat for several). Default: the one holding the default route.
    #[arg(short, long = "iface", value_name = "IF")]
    ifaces: Vec<String>,
    /// How often to read the kernel's tables, e.g. 1s, 500ms, 2m.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    /// Print one JSON object per poll instead of text (schema in README.md).
    #[arg(long)]
    json: bool,
    /// XDP attach mode: native where the driver supports it, else generic.
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    xdp_mode: XdpModeArg,
    /// What counts received packets: the XDP program (cheapest on a
    /// physical NIC) or the TC program at ingress (cheaper on veth and other
    /// virtual interfaces, where XDP copies or reschedules every packet).
    #[arg(long, value_enum, default_value_t = IngressArg::Xdp)]
    ingress: IngressArg,
    /// Replace an XDP program already attached to the interface.
    #[arg(long)]
    replace_xdp: bool,
    /// Connections the kernel table holds (about 313 bytes of kernel memory each).
    #[arg(long, default_value_t = DEFAULT_MAX_FLOWS, value_parser = clap::value_parser!(u32).range(1..))]
    max_flows: u32,
    /// Forward the kernel programs' debug log (aya-log) to this process's log; use with -vv.
    #[arg(long)]
    kernel_log: bool,
    /// Connections listed under each text summary.
    #[arg(long, default_value_t = 10)]
    show: usize,
    /// Past this many connections in the table, read only what changed plus
    /// a slice of a 30 s sweep each poll, not the whole table (timeouts are
    /// then seen up to 30 s late).
    #[arg(long, value_name = "N", default_value_t = flowmon::agent::FULL_SCAN_LIMIT)]
    full_scan_limit: usize,
    /// No per-poll output (as a service: history, metrics, IPFIX and
    /// `flowmon status` carry it all).
    #[arg(long, conflicts_with = "json")]
    quiet: bool,
    /// Stop after this many polls (default: run until Ctrl-C or SIGTERM).
    #[arg(long)]
    polls: Option<u64>,
    #[command(flatten)]
    timeouts: TimeoutArgs,
    /// The API socket the query commands talk to (created root-only, mode 0600).
    #[arg(long, value_name = "PATH", default_value = flowmon::api::DEFAULT_SOCKET)]
    socket: std::path::PathBuf,
    /// Pin the maps and program links (under --pin-dir) so the kernel keeps
    /// counting while no agent runs: stopping leaves them attached, a new
    /// `flowmon run --persist` resumes, `flowmon detach` removes them.
    #[arg(long)]
    persist: bool,
    /// Where --persist pins (a directory on bpffs).
    #[arg(long, value_name = "DIR", default_value = kernel::DEFAULT_PIN_DIR, requires = "persist")]
    pin_dir: PathBuf,
    /// Finished connections kept in memory for queries.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    keep: usize,
    /// Length of the interval aggregates (history, snapshots, graphs, metrics).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    aggregate_interval: Duration,
    /// The history database: closed connections and interval aggregates.
    #[arg(long, value_name = "PATH", default_value = store::DEFAULT_PATH)]
    db: PathBuf,
    /// Keep no history on disk.
    #[arg(long, conflicts_with = "db")]
    no_history: bool,
    /// History older than this is deleted.
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = parse_duration)]
    retention: Duration,
    /// Write JSON-lines snapshot files here (schema in README.md).
    #[arg(long, value_name = "DIR")]
    snapshot_dir: Option<PathBuf>,
    /// Start a new snapshot file this often.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration, requires = "snapshot_dir")]
    snapshot_interval: Duration,
    /// Delete the oldest snapshot files to keep them within this size (e.g. 512M, 2G).
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size, requires = "snapshot_dir")]
    snapshot_max_bytes: u64,
    /// Serve Prometheus metrics on ADDR (PORT or IP:PORT; loopback unless an IP says otherwise).
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = http::DEFAULT_METRICS_ADDR, value_parser = http::parse_addr)]
    metrics: Option<SocketAddr>,
    /// Export IPFIX to this collector: udp://HOST:PORT.
    #[arg(long, value_name = "URL", value_parser = ipfix::parse_target)]
    ipfix: Option<String>,
    /// Long-lived connections get an IPFIX record this often.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    ipfix_active_timeout: Duration,
    /// IPFIX observation domain.
    #[arg(long, value_name = "N", default_value_t = 1)]
    ipfix_domain: u32,
    /// Private enterprise number of flowmon's own IPFIX elements (close class, closed by).
    #[arg(long, value_name = "PEN", default_value_t = ipfix::DEFAULT_PEN)]
    ipfix_pen: u32,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum XdpModeArg {
    Auto,
    Native,
    Generic,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum IngressArg {
    Xdp,
    Tc,
}

/// The resolved configuration: nothing past here sees a clap type.
#[derive(Debug)]
pub struct RunConfig {
    ifaces: Vec<String>,
    interval: Duration,
    json: bool,
    xdp: XdpAttach,
    replace_xdp: bool,
    load: LoadOptions,
    show: usize,
    quiet: bool,
    full_scan_limit: usize,
    polls: Option<u64>,
    timeouts: Timeouts,
    socket: std::path::PathBuf,
    keep: usize,
    sinks: SinkConfig,
    metrics: Option<SocketAddr>,
}

impl RunArgs {
    pub fn resolve(self) -> anyhow::Result<RunConfig> {
        let ifaces = if self.ifaces.is_empty() {
            match iface::default_route().context("reading the routing table")? {
                Some(i) => vec![i],
                None => bail!(
                    "no default route, so no default interface: name one with --iface (see `ip link`)"
                ),
            }
        } else {
            self.ifaces
        };
        Ok(RunConfig {
            ifaces,
            interval: self.interval,
            json: self.json,
            xdp: match (self.ingress, self.xdp_mode) {
                (IngressArg::Tc, _) => XdpAttach::Tc,
                (IngressArg::Xdp, XdpModeArg::Auto) => XdpAttach::Auto,
                (IngressArg::Xdp, XdpModeArg::Native) => XdpAttach::Native,
                (IngressArg::Xdp, XdpModeArg::Generic) => XdpAttach::Generic,
            },
            replace_xdp: self.replace_xdp,
            load: LoadOptions {
                max_flows: self.max_flows,
                kernel_log: self.kernel_log,
                pin: self.persist.then_some(self.pin_dir),
            },
            show: self.show,
            quiet: self.quiet,
            full_scan_limit: self.full_scan_limit,
            polls: self.polls,
            timeouts: self.timeouts.resolve(),
            socket: self.socket,
            keep: self.keep,
            sinks: SinkConfig {
                aggregate_interval: self.aggregate_interval,
                db: (!self.no_history).then_some(self.db),
                retention: self.retention,
                snapshots: self.snapshot_dir.map(|d| {
                    (
                        d,
                        snapshot::Limits::new(
                            self.snapshot_interval.as_millis() as u64,
                            self.snapshot_max_bytes,
                        ),
                    )
                }),
                metrics: self.metrics.is_some(),
                ipfix: self.ipfix.map(|t| {
                    (
                        t,
                        ipfix::Options {
                            domain: self.ipfix_domain,
                            active_timeout: self.ipfix_active_timeout,
                            pen: self.ipfix_pen,
                            ..ipfix::Options::default()
                        },
                    )
                }),
            },
            metrics: self.metrics,
        })
    }
}

/// Parses `1048576`, `64K`, `512M`, `2G` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("{s:?}: the unit is K, M or G (e.g. 512M)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size: write e.g. 1048576, 64K, 512M, 2G"))?;
    n.checked_mul(mult)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("{s:?}: the size must be above zero and below 16 EiB"))
}

/// Parses `500ms`, `1s`, `1.5s`, `2m`, `1h`, `7d`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: write e.g. 500ms, 1s, 2m, 1h, 7d"))?;
    let secs = match unit {
        "ms" => n / 1e3,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?}: use ms, s, m, h or d"
            ));
        }
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("{s:?}: the duration must be greater than zero"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn run(cfg: RunConfig) -> anyhow::Result<()> {
    agent::keep_freed_memory();
    let mut kernel = Kernel::load(cfg.load.clone())?;
    if kernel.resumed() {
        eprintln!(
            "flowmon: resuming the table pinned in {}",
            cfg.load
                .pin
                .as_deref()
                .unwrap_or(std::path::Path::new(""))
                .display()
        );
    }
    for name in &cfg.ifaces {
        let a = kernel.attach(name, cfg.xdp, cfg.replace_xdp)?;
        eprintln!(
            "flowmon: watching {} ({}); Ctrl-C to stop",
            a.iface,
            kernel::hooks(a.xdp_mode)
        );
    }
    let mut agent = Agent::new(kernel, cfg.timeouts);
    // Finished connections come to the agent on the CLOSED ring, which it
    // drains every poll, rather than waiting in the table for a take.
    agent.kernel.hand_over(true)?;
    agent.keep = cfg.keep;
    agent.full_scan_limit = cfg.full_scan_limit;
    agent.list_changed(!cfg.quiet);
    agent.export_held = cfg.sinks.ipfix.is_some();
    // A big table is swept in slices, round it every 30 s.
    agent.sweep_polls = (30.0 / cfg.interval.as_secs_f64()).ceil().max(1.0) as u32;
    agent.resume()?;
    let start_unix = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    let mut sinks = Sinks::open(&cfg.sinks, cfg.load.max_flows, start_unix)?;
    if let Some(db) = &cfg.sinks.db {
        eprintln!("flowmon: keeping history in {}", db.display());
    }
    // Bound before the programs poll anything, so a taken port fails early.
    let metrics_listener = match cfg.metrics {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot serve metrics on {addr} (--metrics)"))?;
            l.set_nonblocking(true)?;
            eprintln!("flowmon: metrics at http://{addr}/metrics");
            Some(l)
        }
        None => None,
    };
    let std_listener = api::bind(&cfg.socket)
        .with_context(|| format!("cannot serve the API on {}", cfg.socket.display()))?;
    std_listener.set_nonblocking(true)?;
    eprintln!("flowmon: answering queries on {}", cfg.socket.display());
    // Everything privileged is done: programs loaded and attached, sockets
    // bound, files opened.
    caps::drop_all().context("dropping capabilities after attaching")?;
    let mut health = Health::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let listener = tokio::net::UnixListener::from_std(std_listener)?;
        if let (Some(l), Some(page)) = (metrics_listener, sinks.page()) {
            tokio::spawn(http::serve(tokio::net::TcpListener::from_std(l)?, page));
        }
        poll_loop(&mut agent, &mut sinks, &cfg, &listener, &mut health).await
    });
    let _ = std::fs::remove_file(&cfg.socket);
    // Report what is still open, then drop the kernel handle, which detaches
    // every program: a monitor that leaves programs behind is not trusted.
    // Pinned, the programs go on counting and the next agent reports what
    // is open now; otherwise report it here.
    let persist = cfg.load.pin.is_some();
    let flushed = if result.is_ok() {
        poll_once(&mut agent, &mut sinks, &cfg, &mut health, !persist)
    } else {
        Ok(())
    };
    drop(agent);
    if persist {
        eprintln!(
            "flowmon: stopped; the programs stay attached and counting (`flowmon detach` removes them)"
        );
    } else {
        eprintln!("flowmon: detached");
    }
    result.and(flushed)
}

async fn poll_loop(
    agent: &mut Agent,
    sinks: &mut Sinks,
    cfg: &RunConfig,
    listener: &tokio::net::UnixListener,
    health: &mut Health,
) -> anyhow::Result<()> {
    let services = Services::system();
    let mut logger = if cfg.load.kernel_log {
        agent.kernel.kernel_logger()
    } else {
        None
    };
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut ticker = tokio::time::interval(cfg.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
            accepted = listener.accept() => {
                // Queries are answered between polls, one at a time: they
                // read the same table the poll does, without locking.
                if let Ok((stream, _)) = accepted {
                    serve(agent, sinks, stream, &services, &status(agent, sinks, cfg, health)).await;
                }
                continue;
            }
        }
        if let Some(l) = logger.as_mut() {
            l.flush();
        }
        match poll_once(agent, sinks, cfg, health, false) {
            Err(e) if is_broken_pipe(&e) => return Ok(()),
            r => r?,
        }
        if cfg.polls.is_some_and(|n| health.polls >= n) {
            return Ok(());
        }
    }
}

/// What the agent knows of its own running, for `flowmon status`.
struct Health {
    started: std::time::Instant,
    polls: u64,
    last_poll: Duration,
    /// The latest poll's kernel counters, table use and evictions.
    last: Option<(
        [u64; flowmon_common::stats::STAT_COUNT as usize],
        usize,
        u64,
    )>,
}

impl Health {
    fn new() -> Self {
        Self {
            started: std::time::Instant::now(),
            polls: 0,
            last_poll: Duration::ZERO,
            last: None,
        }
    }
}

fn status(agent: &Agent, sinks: &Sinks, cfg: &RunConfig, h: &Health) -> Status {
    let (totals, used, evicted) =
        h.last
            .unwrap_or(([0; flowmon_common::stats::STAT_COUNT as usize], 0, 0));
    let path = |p: &std::path::Path| p.display().to_string();
    Status {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        uptime_s: h.started.elapsed().as_secs_f64(),
        poll_interval_s: cfg.interval.as_secs_f64(),
        polls: h.polls,
        partial_polls: agent.partial_polls,
        last_poll_ms: h.last_poll.as_secs_f64() * 1e3,
        ifaces: agent
            .kernel
            .attached()
            .iter()
            .map(|a| status::Iface {
                name: a.iface.clone(),
                ifindex: a.ifindex,
                xdp_mode: a.xdp_mode.into(),
            })
            .collect(),
        pin_dir: cfg.load.pin.as_deref().map(path),
        resumed: agent.kernel.resumed(),
        tick_ns: Some(agent.kernel.ticks().tick_ns),
        table: status::Table {
            capacity: cfg.load.max_flows,
            used: used as u64,
            reported: agent.reported,
            evicted,
            evicted_reported: agent.evicted_reported,
        },
        kernel: status::kernel_counters(&totals),
        exports: status::Exports {
            history: cfg.sinks.db.as_deref().map(path),
            snapshots: cfg.sinks.snapshots.as_ref().map(|(d, _)| path(d)),
            metrics: cfg.metrics.map(|a| format!("http://{a}/metrics")),
            ipfix: cfg.sinks.ipfix.as_ref().map(|(t, _)| format!("udp://{t}")),
            errors: sinks.errors,
        },
        capabilities: caps::effective_names(),
    }
}

/// Answers one API request (see `flowmon::api` for the protocol).
async fn serve(
    agent: &Agent,
    sinks: &Sinks,
    stream: tokio::net::UnixStream,
    services: &Services,
    status: &Status,
) {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read);
    // A client that never sends its line must not stall the polls.
    match tokio::time::timeout(Duration::from_secs(2), reader.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 => {}
        _ => return,
    }
    let reply = match api::parse_request(&line) {
        Err(reply) => reply,
        Ok(req) if req.view == View::Status => Reply::answer(Ok(Response {
            columns: vec![],
            rows: vec![serde_json::to_value(status).expect("a status serializes")],
        })),
        Ok(req) => match records(agent, sinks, req.since) {
            Ok(records) => Reply::answer(views::run(&req, &records, services)),
            Err(e) => Reply::error(e, false),
        },
    };
    let mut out = serde_json::to_string(&reply).expect("a reply serializes");
    out.push('\n');
    let _ = tokio::time::timeout(Duration::from_secs(2), write.write_all(out.as_bytes())).await;
}

/// What a query sees: finished connections (the recent ones, or with
/// `since` those of the history seen in the last `since` seconds), then the
/// live table.
fn records(agent: &Agent, sinks: &Sinks, since: Option<f64>) -> Result<Vec<ConnRecord>, String> {
    let (now, names) = (agent::monotonic_ns(), iface::names());
    let Some(since) = since else {
        return agent
            .records(now, &names)
            .map_err(|e| format!("reading the kernel table failed: {e}"));
    };
    let cutoff = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
        - since;
    let recent: Vec<ConnRecord> = agent.recent().cloned().collect();
    let mut out = sinks
        .since(cutoff, &recent)
        .map_err(|e| format!("reading the history failed: {e}"))?;
    let live = agent
        .live_records(now, &names)
        .map_err(|e| format!("reading the kernel table failed: {e}"))?;
    out.extend(live.into_iter().filter(|r| r.last_seen >= cutoff));
    Ok(out)
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>()
        .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

/// One poll: read, report, print. `flush` reports every connection still
/// in the table (when stopping).
fn poll_once(
    agent: &mut Agent,
    sinks: &mut Sinks,
    cfg: &RunConfig,
    health: &mut Health,
    flush: bool,
) -> anyhow::Result<()> {
    let names = iface::names();
    let started = std::time::Instant::now();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let now_ns = agent::monotonic_ns();
    let result = agent.poll(now_ns, now_ms, &names, flush)?;
    health.polls += 1;
    health.last_poll = started.elapsed();
    health.last = Some((
        result.poll.totals,
        result.poll.flows_active,
        result.poll.flows_evicted,
    ));
    sinks.poll(
        &result,
        &names,
        now_ns,
        Clock::now().offset_ns,
        started.elapsed(),
        flush,
    );
    if cfg.quiet {
        agent.remember(result);
        return Ok(());
    }
    let out = if cfg.json {
        let mut obj =
            summary::poll_json(&result.poll, &names, &Clock::now(), now_ns, &agent.timeouts);
        obj["closed"] = result.closed.iter().map(ConnRecord::to_json).collect();
        let mut line = obj.to_string();
        line.push('\n');
        line
    } else {
        let mut text = summary::poll_text(&result.poll, &names, cfg.show);
        for r in &result.closed {
            text.push_str(&summary::closed_text(r));
        }
        text
    };
    agent.remember(result);
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(
            parse_duration("0s")
                .unwrap_err()
                .contains("greater than zero")
        );
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("5w").unwrap_err().contains("unknown unit"));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("2T").unwrap_err().contains("K, M or G"));
        assert!(parse_size("0").unwrap_err().contains("above zero"));
        assert!(
            parse_duration("fast")
                .unwrap_err()
                .contains("not a duration")
        );
    }
}
