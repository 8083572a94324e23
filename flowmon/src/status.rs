//! `flowmon status`: the running agent's health in one object (what it
//! watches, how full its table is, what it lost to evictions, where it
//! exports), and its rendering as aligned text.

use std::{collections::BTreeMap, fmt::Write as _};

use flowmon_common::stats::{STAT_COUNT, STAT_FLOWS_CREATED, STAT_NAMES};
use serde::{Deserialize, Serialize};

/// One watched interface.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Iface {
    pub name: String,
    pub ifindex: u32,
    /// "native", "generic" or "pinned" (links resumed from an earlier agent).
    pub xdp_mode: String,
}

/// The agent's state, as `flowmon status --json` prints it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_s: f64,
    pub poll_interval_s: f64,
    pub polls: u64,
    /// Of those, polls that read only what changed and a slice of the sweep
    /// (past `--full-scan-limit` connections).
    pub partial_polls: u64,
    /// How long the latest poll took.
    pub last_poll_ms: f64,
    pub ifaces: Vec<Iface>,
    /// Where maps and links are pinned (`--persist`), if they are.
    pub pin_dir: Option<String>,
    /// Whether this agent took over a table an earlier one pinned.
    pub resumed: bool,
    /// The tick of the coarse clock the programs read from jiffies (see
    /// `flowmon::ticks`), in ns. An agent always reports it; `None` only
    /// from an agent older than the field.
    #[serde(default)]
    pub tick_ns: Option<u64>,
    pub table: Table,
    /// Kernel counters since the programs were loaded, by name.
    pub kernel: BTreeMap<String, u64>,
    pub exports: Exports,
    /// Effective capabilities: none once the programs are attached.
    pub capabilities: Vec<String>,
}

/// The flow table and what left it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Table {
    /// Entries it holds (`--max-flows`).
    pub capacity: u32,
    pub used: u64,
    /// Connections finished and reported by this agent, evicted ones included.
    pub reported: u64,
    /// Entries the kernel pushed out to make room, since load.
    pub evicted: u64,
    /// Of those, reported with their last-polled counts (class `evicted`);
    /// the rest came and went between two polls and are only counted.
    pub evicted_reported: u64,
}

/// Where the agent exports, and how often that failed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Exports {
    pub history: Option<String>,
    pub snapshots: Option<String>,
    pub metrics: Option<String>,
    pub ipfix: Option<String>,
    pub errors: u64,
}

/// Names the kernel counters.
pub fn kernel_counters(totals: &[u64; STAT_COUNT as usize]) -> BTreeMap<String, u64> {
    STAT_NAMES
        .iter()
        .zip(totals)
        .map(|(n, v)| (n.to_string(), *v))
        .collect()
}

impl Status {
    /// Entries the kernel created since load.
    pub fn created(&self) -> u64 {
        self.kernel
            .get(STAT_NAMES[STAT_FLOWS_CREATED as usize])
            .copied()
            .unwrap_or(0)
    }

    /// Aligned `label  value` lines.
    pub fn text(&self) -> String {
        let mut lines: Vec<(&str, String)> = vec![
            (
                "agent",
                format!(
                    "flowmon {}, pid {}, up {}, {} polls every {}s ({} incremental; last took {:.1} ms)",
                    self.version,
                    self.pid,
                    human_duration(self.uptime_s),
                    self.polls,
                    self.poll_interval_s,
                    self.partial_polls,
                    self.last_poll_ms
                ),
            ),
            (
                "interfaces",
                self.ifaces
                    .iter()
                    .map(|i| format!("{} ({})", i.name, crate::kernel::hooks(&i.xdp_mode)))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            (
                "pinned",
                match &self.pin_dir {
                    Some(d) if self.resumed => format!("{d} (resumed)"),
                    Some(d) => d.clone(),
                    None => "no (programs detach when the agent stops)".into(),
                },
            ),
        ];
        lines.push((
            "clock",
            match self.tick_ns {
                Some(t) => format!(
                    "jiffies (tick {} ms): events in order, times within a tick",
                    t as f64 / 1e6
                ),
                None => "not reported (an older agent)".into(),
            },
        ));
        let t = &self.table;
        let pct = if t.capacity == 0 {
            0.0
        } else {
            t.used as f64 * 100.0 / f64::from(t.capacity)
        };
        lines.push((
            "table",
            format!("{} of {} entries ({pct:.1}%)", t.used, t.capacity),
        ));
        lines.push((
            "connections",
            format!("{} created, {} reported", self.created(), t.reported),
        ));
        lines.push((
            "evicted",
            if t.evicted == 0 {
                "0".into()
            } else {
                format!(
                    "{} ({} reported as class evicted, {} unseen between polls): raise --max-flows",
                    t.evicted,
                    t.evicted_reported,
                    t.evicted.saturating_sub(t.evicted_reported)
                )
            },
        ));
        lines.push((
            "packets",
            ["packets", "tcp", "non_tcp", "malformed", "fragments"]
                .iter()
                .map(|k| {
                    format!(
                        "{} {}",
                        k.replace('_', "-"),
                        self.kernel.get(*k).unwrap_or(&0)
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
        ));
        let lost = ["insert_failed", "split_failed"]
            .iter()
            .map(|k| self.kernel.get(*k).copied().unwrap_or(0))
            .sum::<u64>();
        lines.push(("kernel losses", lost.to_string()));
        let e = &self.exports;
        for (label, v) in [
            ("history", &e.history),
            ("snapshots", &e.snapshots),
            ("metrics", &e.metrics),
            ("ipfix", &e.ipfix),
        ] {
            lines.push((label, v.clone().unwrap_or_else(|| "off".into())));
        }
        lines.push(("export errors", e.errors.to_string()));
        lines.push((
            "capabilities",
            if self.capabilities.is_empty() {
                "none (dropped after attaching)".into()
            } else {
                self.capabilities.join(" ")
            },
        ));
        let width = lines.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (label, value) in lines {
            let _ = writeln!(out, "{label:<width$}  {value}");
        }
        out
    }
}

/// `3d4h`, `2h5m`, `4m10s`, `12s`.
fn human_duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Status {
        let mut totals = [0; STAT_COUNT as usize];
        totals[0] = 1000;
        totals[1] = 990;
        totals[3] = 2;
        totals[STAT_FLOWS_CREATED as usize] = 300;
        Status {
            version: "0.1.0".into(),
            pid: 42,
            uptime_s: 3725.0,
            poll_interval_s: 1.0,
            polls: 3725,
            partial_polls: 0,
            last_poll_ms: 1.25,
            ifaces: vec![Iface {
                name: "veth0".into(),
                ifindex: 3,
                xdp_mode: "native".into(),
            }],
            pin_dir: None,
            resumed: false,
            tick_ns: Some(4_000_000),
            table: Table {
                capacity: 128,
                used: 64,
                reported: 230,
                evicted: 10,
                evicted_reported: 7,
            },
            kernel: kernel_counters(&totals),
            exports: Exports {
                metrics: Some("http://127.0.0.1:9475/metrics".into()),
                ..Exports::default()
            },
            capabilities: vec![],
        }
    }

    #[test]
    fn text_names_every_loss_and_what_to_do() {
        let text = status().text();
        assert_eq!(
            text,
            "agent          flowmon 0.1.0, pid 42, up 1h2m, 3725 polls every 1s (0 incremental; last took 1.2 ms)
interfaces     veth0 (XDP native, TC egress)
pinned         no (programs detach when the agent stops)
clock          jiffies (tick 4 ms): events in order, times within a tick
table          64 of 128 entries (50.0%)
connections    300 created, 230 reported
evicted        10 (7 reported as class evicted, 3 unseen between polls): raise --max-flows
packets        packets 1000, tcp 990, non-tcp 0, malformed 2, fragments 0
kernel losses  0
history        off
snapshots      off
metrics        http://127.0.0.1:9475/metrics
ipfix          off
export errors  0
capabilities   none (dropped after attaching)
"
        );
    }

    #[test]
    fn json_round_trips() {
        let s = status();
        let j = serde_json::to_value(&s).unwrap();
        assert_eq!(j["table"]["evicted_reported"], 7);
        assert_eq!(j["tick_ns"], 4_000_000);
        assert_eq!(j["kernel"]["flows_created"], 300);
        assert_eq!(serde_json::from_value::<Status>(j).unwrap(), s);
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(
            [12.0, 250.0, 7500.0, 300_000.0].map(human_duration),
            ["12s", "4m10s", "2h5m", "3d11h"]
        );
    }
}
