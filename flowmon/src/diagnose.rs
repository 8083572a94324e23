//! `flowmon diagnose`: findings in plain words, each with its evidence and
//! the addresses and ports involved.
//!
//! - a server port refusing connections (server RST to SYNs, no connection);
//! - SYNs never answered (silent drops);
//! - an application that closes every session with RST;
//! - transfers aborted by the client (client FIN, then client RSTs while the
//!   server was still sending: usually a user interrupting);
//! - RSTs without any connection.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde_json::{Value, json};

use crate::{
    close::{Close, ClosedBy},
    record::ConnRecord,
    services::Services,
    views::{Column, Kind, Response},
};

/// An application is said to close everything with RST from this many
/// established connections on.
const RST_CLOSER_MIN: usize = 3;

type ServerPort = (IpAddr, u16);

#[derive(Default)]
struct Group<'a> {
    records: Vec<&'a ConnRecord>,
}

impl Group<'_> {
    fn clients(&self) -> BTreeSet<IpAddr> {
        self.records.iter().map(|r| r.conn.client().0).collect()
    }

    fn count(&self, close: Close) -> usize {
        self.records.iter().filter(|r| r.close == close).count()
    }
}

fn port_name(services: &Services, port: u16) -> String {
    services
        .name(port)
        .map_or_else(|| port.to_string(), |n| format!("{port} ({n})"))
}

fn endpoint(ip: IpAddr, port: &str) -> String {
    if ip.is_ipv6() {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

fn list(ips: &BTreeSet<IpAddr>) -> String {
    const SHOWN: usize = 5;
    let mut s: Vec<String> = ips.iter().take(SHOWN).map(ToString::to_string).collect();
    if ips.len() > SHOWN {
        s.push(format!("and {} more", ips.len() - SHOWN));
    }
    s.join(", ")
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The findings for `records`, warnings first, then by how many connections
/// each concerns.
pub fn findings(records: &[&ConnRecord], services: &Services) -> Response {
    let mut by_port: BTreeMap<ServerPort, Group> = BTreeMap::new();
    for r in records {
        by_port.entry(r.conn.server()).or_default().records.push(r);
    }
    let mut rows: Vec<(u8, usize, Value)> = Vec::new();
    let mut add = |severity: &str,
                   kind: &str,
                   at: ServerPort,
                   n: usize,
                   clients: &BTreeSet<IpAddr>,
                   summary: String,
                   evidence: String| {
        let rank = if severity == "warning" { 0 } else { 1 };
        rows.push((
            rank,
            n,
            json!({
                "severity": severity,
                "kind": kind,
                "server.ip": at.0.to_string(),
                "server.port": at.1,
                "app": services.name(at.1).unwrap_or("-"),
                "conns": n,
                "clients": clients.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "summary": summary,
                "evidence": evidence,
            }),
        ));
    };
    for (&(ip, port), g) in &by_port {
        let at = endpoint(ip, &port_name(services, port));
        let attempts = g.records.len();
        let syn: u64 = g.records.iter().map(|r| u64::from(r.conn.clt().syn)).sum();
        let syn_per = syn as f64 / attempts as f64;

        let refused: Vec<&&ConnRecord> = g
            .records
            .iter()
            .filter(|r| r.close == Close::Refused)
            .collect();
        if !refused.is_empty() {
            let clients: BTreeSet<IpAddr> = refused.iter().map(|r| r.conn.client().0).collect();
            let rst: u64 = refused.iter().map(|r| u64::from(r.conn.srv().rst)).sum();
            add(
                "warning",
                "refused",
                (ip, port),
                refused.len(),
                &clients,
                format!(
                    "{at} refused {} of {attempts} connection attempts from {}",
                    refused.len(),
                    list(&clients)
                ),
                format!(
                    "{} from the server to SYNs with no connection (ct.count = 0); SYN per connection {syn_per:.2} on this port",
                    plural(rst as usize, "RST", "RSTs")
                ),
            );
        }

        let unanswered: Vec<&&ConnRecord> = g
            .records
            .iter()
            .filter(|r| r.close == Close::Unanswered)
            .collect();
        if !unanswered.is_empty() {
            let clients: BTreeSet<IpAddr> = unanswered.iter().map(|r| r.conn.client().0).collect();
            let syns: u64 = unanswered.iter().map(|r| u64::from(r.conn.clt().syn)).sum();
            add(
                "warning",
                "unanswered",
                (ip, port),
                unanswered.len(),
                &clients,
                format!(
                    "{} to {at} never got an answer: silent drops (a firewall, a dead host or a full listen backlog)",
                    plural(
                        unanswered.len(),
                        "connection attempt",
                        "connection attempts"
                    )
                ),
                format!(
                    "{} sent, no SYN-ACK or RST came back; clients {}",
                    plural(syns as usize, "SYN", "SYNs"),
                    list(&clients)
                ),
            );
        }

        let established: Vec<&&ConnRecord> = g
            .records
            .iter()
            .filter(|r| r.conn.ct_count() == 1 && r.close.is_final())
            .collect();
        let rst_only = established.iter().filter(|r| r.close == Close::Rst).count();
        if established.len() >= RST_CLOSER_MIN && rst_only == established.len() {
            let by: BTreeSet<&str> = established.iter().map(|r| r.closed_by.as_str()).collect();
            let who = if by.len() == 1 {
                by.iter().next().copied().unwrap_or("both")
            } else {
                "both sides"
            };
            add(
                "info",
                "rst-close",
                (ip, port),
                rst_only,
                &g.clients(),
                format!(
                    "the application on {at} ends every session with RST, never FIN: harmless, but it hides real aborts among them"
                ),
                format!(
                    "{rst_only} of {} closed connections ended by RST from the {who}, none by FIN",
                    established.len()
                ),
            );
        }

        let aborted: Vec<&&ConnRecord> = g
            .records
            .iter()
            .filter(|r| {
                let (c, s) = (r.conn.clt(), r.conn.srv());
                r.close == Close::FinRst
                    && r.closed_by == ClosedBy::Client
                    && c.first_fin_ns != 0
                    && c.first_fin_ns < c.first_rst_ns
                    && s.data_packets > 0
                    && s.fin == 0
            })
            .collect();
        if !aborted.is_empty() {
            let clients: BTreeSet<IpAddr> = aborted.iter().map(|r| r.conn.client().0).collect();
            let rsts: u64 = aborted.iter().map(|r| u64::from(r.conn.clt().rst)).sum();
            add(
                "info",
                "client-abort",
                (ip, port),
                aborted.len(),
                &clients,
                format!(
                    "{} from {at} aborted by the client: it closed while the server was still sending, usually a user interrupting",
                    plural(aborted.len(), "transfer", "transfers")
                ),
                format!(
                    "client FIN, then {} from the client to the server's data; clients {}",
                    plural(rsts as usize, "RST", "RSTs"),
                    list(&clients)
                ),
            );
        }

        let orphans = g.count(Close::OrphanRst);
        if orphans > 0 {
            let group: Vec<&&ConnRecord> = g
                .records
                .iter()
                .filter(|r| r.close == Close::OrphanRst)
                .collect();
            let clients: BTreeSet<IpAddr> = group.iter().map(|r| r.conn.client().0).collect();
            let rsts: u64 = group
                .iter()
                .map(|r| u64::from(r.conn.clt().rst + r.conn.srv().rst))
                .sum();
            add(
                "warning",
                "orphan-rst",
                (ip, port),
                orphans,
                &clients,
                format!("{} between {at} and {} without any connection: no SYN, no data, only RST", plural(rsts as usize, "RST", "RSTs"), list(&clients)),
                "RSTs for connections this host never saw: state lost on one side (a restart, a failover, a NAT timeout), or spoofed".to_string(),
            );
        }
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let columns = vec![
        Column {
            key: "severity".into(),
            title: "severity".into(),
            kind: Kind::Text,
        },
        Column {
            key: "summary".into(),
            title: "finding".into(),
            kind: Kind::Text,
        },
        Column {
            key: "evidence".into(),
            title: "evidence".into(),
            kind: Kind::Text,
        },
    ];
    Response {
        columns,
        rows: rows.into_iter().map(|r| r.2).collect(),
    }
}
