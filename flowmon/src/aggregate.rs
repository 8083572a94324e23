//! Metrics per client, per server and per server port, from connection
//! records: connections, SYN per connection, FIN and RST from each side, RST
//! per connection, and the mix of close classes.

use std::{collections::BTreeMap, net::IpAddr};

use serde_json::{Value, json};

use crate::{close::Close, record::ConnRecord};

/// What to group connections by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    Client,
    Server,
    /// Server address and port.
    ServerPort,
    /// Client address, server address and port.
    Conversation,
}

/// Group key: an address, the server port for [`GroupBy::ServerPort`], and
/// the client too for [`GroupBy::Conversation`] (then `ip` is the server's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Group {
    pub ip: IpAddr,
    pub port: Option<u16>,
    pub client: Option<IpAddr>,
}

/// Metrics of one group.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics {
    /// Connection records (every lifetime, established or not).
    pub conns: u64,
    /// Established connections (`ct.count`).
    pub ct: u64,
    pub syn: u64,
    pub fin_clt: u64,
    pub fin_srv: u64,
    pub rst_clt: u64,
    pub rst_srv: u64,
    pub closes: BTreeMap<Close, u64>,
}

impl Metrics {
    /// SYN per connection record: above 1 means retries.
    pub fn syn_per_conn(&self) -> f64 {
        ratio(self.syn, self.conns)
    }

    /// RST per connection record, both sides.
    pub fn rst_per_conn(&self) -> f64 {
        ratio(self.rst_clt + self.rst_srv, self.conns)
    }

    pub fn rst_per_conn_clt(&self) -> f64 {
        ratio(self.rst_clt, self.conns)
    }

    pub fn rst_per_conn_srv(&self) -> f64 {
        ratio(self.rst_srv, self.conns)
    }

    pub fn add(&mut self, r: &ConnRecord) {
        let (c, s) = (r.conn.clt(), r.conn.srv());
        self.conns += 1;
        self.ct += u64::from(r.conn.ct_count());
        self.syn += u64::from(c.syn);
        self.fin_clt += u64::from(c.fin);
        self.fin_srv += u64::from(s.fin);
        self.rst_clt += u64::from(c.rst);
        self.rst_srv += u64::from(s.rst);
        *self.closes.entry(r.close).or_default() += 1;
    }

    /// The metrics alone as flat JSON, in the vocabulary's style.
    pub fn fields_json(&self) -> Value {
        let mut v = json!({
            "conns": self.conns,
            "ct.count": self.ct,
            "syn.count": self.syn,
            "syn.per_conn": self.syn_per_conn(),
            "fin.count.clt": self.fin_clt,
            "fin.count.srv": self.fin_srv,
            "rst.count.clt": self.rst_clt,
            "rst.count.srv": self.rst_srv,
            "rst.per_conn": self.rst_per_conn(),
            "rst.per_conn.clt": self.rst_per_conn_clt(),
            "rst.per_conn.srv": self.rst_per_conn_srv(),
        });
        // The close mix as one numeric field per class, so filters reach it:
        // `close.refused > 0`.
        for c in Close::ALL {
            v[format!("close.{}", c.as_str())] = json!(self.closes.get(&c).copied().unwrap_or(0));
        }
        v
    }

    /// The metrics and the group's keys as flat JSON.
    pub fn to_json(&self, g: &Group, by: GroupBy) -> Value {
        let mut v = self.fields_json();
        let who = if by == GroupBy::Client {
            "client"
        } else {
            "server"
        };
        v[format!("{who}.ip")] = json!(g.ip.to_string());
        if let Some(p) = g.port {
            v["server.port"] = json!(p);
        }
        if let Some(c) = g.client {
            v["client.ip"] = json!(c.to_string());
        }
        v
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// Groups `records` and sums each group.
pub fn aggregate(records: &[ConnRecord], by: GroupBy) -> BTreeMap<Group, Metrics> {
    let mut m: BTreeMap<Group, Metrics> = BTreeMap::new();
    for r in records {
        let (client, (server, port)) = (r.conn.client().0, r.conn.server());
        let g = match by {
            GroupBy::Client => Group {
                ip: client,
                port: None,
                client: None,
            },
            GroupBy::Server => Group {
                ip: server,
                port: None,
                client: None,
            },
            GroupBy::ServerPort => Group {
                ip: server,
                port: Some(port),
                client: None,
            },
            GroupBy::Conversation => Group {
                ip: server,
                port: Some(port),
                client: Some(client),
            },
        };
        m.entry(g).or_default().add(r);
    }
    m
}

#[cfg(test)]
mod tests {
    use flowmon_common::flow::{DIR_A_TO_B, DIR_B_TO_A, FlowKey, FlowValue};

    use super::*;
    use crate::{close::Timeouts, model::Conn};

    fn rec(
        client_port: u16,
        server_port: u16,
        clt: (u32, u32, u32),
        srv: (u32, u32, u32),
    ) -> ConnRecord {
        let mut k = FlowKey {
            port_a: server_port,
            port_b: client_port,
            family: 4,
            ..Default::default()
        };
        k.addr_a[..4].copy_from_slice(&[10, 0, 0, 1]);
        k.addr_b[..4].copy_from_slice(&[10, 0, 0, 2]);
        let mut v = FlowValue::default();
        let c = &mut v.dir[DIR_B_TO_A];
        (c.syn, c.fin, c.rst) = clt;
        c.packets = 1;
        c.first_ns = 1;
        c.first_syn_ns = 1;
        let s = &mut v.dir[DIR_A_TO_B];
        (s.synack, s.fin, s.rst) = srv;
        s.packets = u64::from(srv.0 + srv.1 + srv.2);
        s.first_ns = 2;
        ConnRecord::new(
            Conn::new(k, v),
            "if0".into(),
            10_000_000_000,
            &Timeouts::default(),
            0,
        )
    }

    #[test]
    fn a_refusing_server_port() {
        let records = vec![
            rec(5000, 110, (1, 0, 0), (0, 0, 1)),
            rec(5000, 110, (2, 0, 0), (0, 0, 1)),
            rec(5001, 22, (1, 0, 0), (0, 0, 0)),
        ];
        let by_port = aggregate(&records, GroupBy::ServerPort);
        let pop = &by_port[&Group {
            ip: "10.0.0.1".parse().unwrap(),
            port: Some(110),
            client: None,
        }];
        assert_eq!(
            (pop.conns, pop.ct, pop.syn, pop.rst_srv, pop.rst_clt),
            (2, 0, 3, 2, 0)
        );
        assert_eq!(
            (
                pop.syn_per_conn(),
                pop.rst_per_conn(),
                pop.rst_per_conn_srv()
            ),
            (1.5, 1.0, 1.0)
        );
        assert_eq!(pop.closes[&Close::Refused], 2);
        let server = &aggregate(&records, GroupBy::Server)[&Group {
            ip: "10.0.0.1".parse().unwrap(),
            port: None,
            client: None,
        }];
        assert_eq!(
            (server.conns, server.syn, server.closes[&Close::Unanswered]),
            (3, 4, 1)
        );
        let j = pop.to_json(
            &Group {
                ip: "10.0.0.1".parse().unwrap(),
                port: Some(110),
                client: None,
            },
            GroupBy::ServerPort,
        );
        assert_eq!(
            (
                j["server.ip"].as_str(),
                j["server.port"].as_u64(),
                j["rst.per_conn"].as_f64(),
                j["close.refused"].as_u64()
            ),
            (Some("10.0.0.1"), Some(110), Some(1.0), Some(2))
        );
        let clients = aggregate(&records, GroupBy::Client);
        assert_eq!(clients.len(), 1);
    }
}
