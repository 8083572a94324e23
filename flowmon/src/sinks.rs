//! Where each poll's results go besides the terminal: interval aggregates,
//! the history store, snapshot files, Prometheus metrics and IPFIX.
//!
//! A sink that fails while running (a full disk, an unreachable collector)
//! is logged and counted in `flowmon_agent_export_errors_total`, and the
//! agent goes on counting: losing an export must not stop the monitor.

use std::{
    collections::HashMap,
    net::UdpSocket,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    agent::PollResult,
    interval::{Aggregate, Intervals},
    ipfix::{self, Exporter},
    metrics::Metrics,
    record::ConnRecord,
    snapshot::{self, Snapshots},
    store::{Store, StoreError},
};

/// What `flowmon run` was asked to export.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    pub aggregate_interval: Duration,
    /// The history database, if kept.
    pub db: Option<std::path::PathBuf>,
    pub retention: Duration,
    pub snapshots: Option<(std::path::PathBuf, snapshot::Limits)>,
    pub metrics: bool,
    /// IPFIX collector `HOST:PORT` and settings.
    pub ipfix: Option<(String, ipfix::Options)>,
}

/// The latest metrics page, in both formats, shared with the HTTP server.
#[derive(Default)]
pub struct Page {
    pub text: String,
    pub openmetrics: String,
}

pub struct Sinks {
    intervals: Intervals,
    store: Option<Store>,
    retention: Duration,
    last_prune_ms: u64,
    snapshots: Option<Snapshots>,
    metrics: Option<(Metrics, Arc<Mutex<Page>>)>,
    ipfix: Option<(Exporter, UdpSocket)>,
    /// Failed writes and sends since the agent started.
    pub errors: u64,
}

impl Sinks {
    /// Opens every configured sink; `capacity` is the kernel table's size.
    pub fn open(cfg: &SinkConfig, capacity: u32, start_unix: f64) -> anyhow::Result<Self> {
        let store = match &cfg.db {
            Some(p) => Some(
                Store::open(p)
                    .context("cannot open the history database (use --db PATH, or --no-history)")?,
            ),
            None => None,
        };
        let snapshots = match &cfg.snapshots {
            Some((dir, limits)) => Some(Snapshots::new(dir, *limits)?),
            None => None,
        };
        let ipfix = match &cfg.ipfix {
            Some((target, opts)) => {
                let sock = UdpSocket::bind(if target.starts_with('[') {
                    "[::]:0"
                } else {
                    "0.0.0.0:0"
                })?;
                sock.connect(target)
                    .with_context(|| format!("IPFIX collector {target}"))?;
                Some((Exporter::new(*opts), sock))
            }
            None => None,
        };
        Ok(Self {
            intervals: Intervals::new(cfg.aggregate_interval.as_millis() as u64),
            store,
            retention: cfg.retention,
            last_prune_ms: 0,
            snapshots,
            metrics: cfg.metrics.then(|| {
                (
                    Metrics::new(capacity, start_unix),
                    Arc::new(Mutex::new(Page::default())),
                )
            }),
            ipfix,
            errors: 0,
        })
    }

    /// The page the metrics server answers with.
    pub fn page(&self) -> Option<Arc<Mutex<Page>>> {
        self.metrics.as_ref().map(|(_, p)| p.clone())
    }

    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    /// Hands one poll to every sink. `last` closes the current interval and
    /// snapshot file (the agent is stopping).
    #[allow(clippy::too_many_arguments)]
    pub fn poll(
        &mut self,
        r: &PollResult,
        names: &HashMap<u32, String>,
        now_ns: u64,
        offset_ns: i128,
        took: Duration,
        last: bool,
    ) {
        let now_ms = r.poll.time_unix_ms;
        let opened: Vec<(String, u64)> = r
            .poll
            .opened
            .iter()
            .map(|(i, n)| (names.get(i).cloned().unwrap_or_else(|| i.to_string()), *n))
            .collect();
        let mut rows = self.intervals.add(now_ms, &opened, &r.closed);
        if last {
            rows.extend(self.intervals.finish(now_ms));
        }
        let mut errors = Vec::new();
        if let Some(store) = &mut self.store
            && let Err(e) = store_poll(
                store,
                &r.closed,
                &rows,
                now_ms,
                self.retention,
                &mut self.last_prune_ms,
            )
        {
            log::warn!("history: {e}");
            errors.push("history");
        }
        if let Some(s) = &mut self.snapshots {
            let res = s
                .write(now_ms, &r.closed, &rows)
                .and_then(|()| if last { s.close() } else { Ok(()) });
            if let Err(e) = res {
                log::warn!("snapshots: {e}");
                errors.push("snapshot");
            }
        }
        let mut sent = (0, 0);
        if let Some((exporter, sock)) = &mut self.ipfix {
            let records = exporter.records(&r.closed, &r.live, now_ns, offset_ns);
            for m in exporter.messages(&records, now_ms) {
                // A refusal reported now belongs to an earlier datagram (the
                // ICMP came back after it); this one was not sent: send again,
                // so a collector that restarts loses nothing more.
                let sent_once = match sock.send(&m) {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => sock.send(&m),
                    r => r,
                };
                match sent_once {
                    Ok(_) => sent.0 += 1,
                    Err(e) => {
                        log::warn!("IPFIX: {e}");
                        errors.push("ipfix");
                    }
                }
            }
            sent.1 = records.len() as u64;
        }
        self.errors += errors.len() as u64;
        if let Some((m, page)) = &mut self.metrics {
            m.observe_poll(&r.poll, &r.closed, names, took);
            if rows.iter().any(|a| a.end_ms > a.start_ms) {
                m.observe_interval(&rows);
            }
            for e in errors {
                m.export_error(e);
            }
            m.ipfix_sent(sent.0, sent.1);
            let mut p = page.lock().expect("the page lock is never poisoned");
            p.text = m.render_text();
            p.openmetrics = m.render();
        }
    }

    /// Finished connections for a `--since` query: from the history when it
    /// is kept, else from what the agent still remembers (`recent`).
    pub fn since(&self, unix: f64, recent: &[ConnRecord]) -> Result<Vec<ConnRecord>, StoreError> {
        match &self.store {
            Some(s) => s.conns_since(unix),
            None => Ok(recent
                .iter()
                .filter(|r| r.last_seen >= unix)
                .cloned()
                .collect()),
        }
    }
}

fn store_poll(
    store: &mut Store,
    closed: &[ConnRecord],
    rows: &[Aggregate],
    now_ms: u64,
    retention: Duration,
    last_prune_ms: &mut u64,
) -> Result<(), StoreError> {
    store.add(closed, rows)?;
    // Pruning scans an index: once a minute is plenty.
    if now_ms.saturating_sub(*last_prune_ms) >= 60_000 {
        *last_prune_ms = now_ms;
        let cutoff = now_ms.saturating_sub(retention.as_millis() as u64) as f64 / 1e3;
        store.prune(cutoff)?;
    }
    Ok(())
}
