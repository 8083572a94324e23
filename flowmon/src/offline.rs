//! The user-space twin of the kernel programs: the same parser, the same
//! split rule and the same counting routine over a `HashMap`, for captures
//! read without root (`flowmon analyze`).

use std::collections::HashMap;

use flowmon_common::{
    count::{Fixed, record, starts_new_connection},
    flow::{FlowKey, FlowValue},
    parse::{Parsed, TcpSegment, parse_ethernet},
    stats::*,
};

/// Connections and global counters built from a stream of frames.
#[derive(Default)]
pub struct OfflineTable {
    flows: HashMap<FlowKey, FlowValue>,
    /// Connections ended by a new one on their tuple, in the order they ended.
    retired: Vec<(FlowKey, FlowValue)>,
    pub totals: [u64; STAT_COUNT as usize],
}

impl OfflineTable {
    /// Counts one Ethernet frame seen on interface `ifindex` at `ts_ns`, as
    /// the XDP program would.
    pub fn packet(&mut self, frame: &[u8], ifindex: u32, ts_ns: u64) {
        self.totals[STAT_PACKETS as usize] += 1;
        let mut seg = TcpSegment::default();
        let stat = match parse_ethernet(frame, ifindex, &mut seg) {
            Parsed::Tcp => STAT_TCP,
            Parsed::NotTcp => STAT_NON_TCP,
            Parsed::Fragment => STAT_FRAGMENTS,
            Parsed::Malformed => STAT_MALFORMED,
        };
        self.totals[stat as usize] += 1;
        if stat != STAT_TCP {
            return;
        }
        let value = match self.flows.entry(seg.key) {
            std::collections::hash_map::Entry::Occupied(e) => {
                let v = e.into_mut();
                if starts_new_connection(v, &seg) {
                    self.retired.push((seg.key, *v));
                    self.totals[STAT_RETIRED as usize] += 1;
                    *v = FlowValue::default();
                }
                v
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                self.totals[STAT_FLOWS_CREATED as usize] += 1;
                e.insert(FlowValue::default())
            }
        };
        // Safety: `value` is a live exclusive borrow of the map's element.
        unsafe { record(value, &seg, 1, u64::from(seg.ip_len), &Fixed(ts_ns)) };
    }

    /// Every connection: the retired ones, then those still in the table.
    pub fn into_flows(self) -> Vec<(FlowKey, FlowValue)> {
        let mut all = self.retired;
        all.extend(self.flows);
        all
    }
}

/// What a capture holds, connection by connection.
#[derive(Debug)]
pub struct Analysis {
    pub records: Vec<crate::record::ConnRecord>,
    pub totals: [u64; STAT_COUNT as usize],
    /// Time of the last packet, the "now" incomplete connections are judged at.
    pub end_ns: u64,
    /// Why reading stopped before the end of the file (a capture cut short
    /// in the middle of a packet, or damaged): the analysis covers the
    /// packets before it.
    pub damaged: Option<crate::capture::CaptureError>,
}

impl Analysis {
    /// Says on stderr that the analysis stops short of the file's end.
    pub fn warn(&self) {
        if let Some(e) = &self.damaged {
            let cause = std::error::Error::source(e).map_or(String::new(), |s| format!(": {s}"));
            eprintln!(
                "flowmon: warning: {e}{cause}; the {} packets before it are analysed, the rest of the file is not",
                self.totals[flowmon_common::stats::STAT_PACKETS as usize]
            );
        }
    }
}

/// The next packet of `cap`; a read error ends the capture and is kept in
/// `damaged`: a pcap has no markers to resynchronise on after a bad record.
pub fn next_packet(
    cap: &mut crate::capture::Capture,
    damaged: &mut Option<crate::capture::CaptureError>,
) -> Option<crate::capture::Packet> {
    match cap.next()? {
        Ok(p) => Some(p),
        Err(e) => {
            *damaged = Some(e);
            None
        }
    }
}

/// Interface names of a capture as flow keys carry them: capture interface
/// `i` is ifindex `i + 1`, as `replay` sees it (the kernel's test runs
/// receive on the loopback device, ifindex 1).
pub fn capture_names(
    cap: &crate::capture::Capture,
    ifaces: u32,
) -> std::collections::HashMap<u32, String> {
    (0..ifaces.max(1))
        .map(|i| (i + 1, cap.iface_name(i)))
        .collect()
}

/// Reads a whole capture through the user-space table.
pub fn analyze(
    path: &std::path::Path,
    t: &crate::close::Timeouts,
) -> Result<Analysis, crate::capture::CaptureError> {
    let mut cap = crate::capture::Capture::open(path)?;
    let mut table = OfflineTable::default();
    let mut end_ns = 0;
    let mut ifaces = 0;
    let mut damaged = None;
    while let Some(p) = next_packet(&mut cap, &mut damaged) {
        end_ns = end_ns.max(p.ts_ns);
        ifaces = ifaces.max(p.iface + 1);
        table.packet(&p.frame, p.iface + 1, p.ts_ns);
    }
    let names = capture_names(&cap, ifaces);
    let totals = table.totals;
    let records = crate::record::build(table.into_flows(), &names, end_ns, t, 0);
    Ok(Analysis {
        records,
        totals,
        end_ns,
        damaged,
    })
}
