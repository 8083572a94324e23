//! Reads pcap and pcapng files and turns every link type flowmon supports
//! into the Ethernet frame the kernel programs see, so that the offline path
//! (`analyze`) and the kernel path (`replay`) parse exactly the same bytes.

use std::{
    fs::File,
    io::{BufReader, Read},
    path::{Path, PathBuf},
};

use pcap_file::{
    DataLink, PcapError,
    pcap::PcapReader,
    pcapng::{Block, PcapNgReader, blocks::interface_description::InterfaceDescriptionOption},
};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot open capture {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", if *.packet == 0 {
        format!("{} is not a pcap or pcapng capture (its file header is unreadable)", .path.display())
    } else {
        format!("{}: packet {} is cut short or damaged", .path.display(), .packet)
    })]
    Format {
        path: PathBuf,
        packet: u64,
        #[source]
        source: PcapError,
    },
    #[error(
        "{path}: link type {link:?} is not supported: flowmon reads Ethernet, Linux cooked (SLL, SLL2), raw IP and BSD loopback captures"
    )]
    Link { path: PathBuf, link: DataLink },
}

/// One packet, as an Ethernet frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Capture time, nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    /// Index of the capture interface (0 for pcap).
    pub iface: u32,
    pub frame: Vec<u8>,
}

enum Inner {
    Pcap(PcapReader<BufReader<File>>, DataLink),
    PcapNg(Box<PcapNgReader<BufReader<File>>>),
}

/// A capture file being read.
pub struct Capture {
    path: PathBuf,
    inner: Inner,
    /// Per pcapng interface: link type, `if_tsresol`, name.
    ifaces: Vec<(DataLink, Option<u8>, String)>,
    count: u64,
}

const PCAPNG_MAGIC: [u8; 4] = [0x0a, 0x0d, 0x0d, 0x0a];

impl Capture {
    pub fn open(path: &Path) -> Result<Self, CaptureError> {
        let open = || {
            File::open(path).map_err(|source| CaptureError::Open {
                path: path.into(),
                source,
            })
        };
        let mut magic = [0u8; 4];
        let n = open()?
            .read(&mut magic)
            .map_err(|source| CaptureError::Open {
                path: path.into(),
                source,
            })?;
        let fmt = |source| CaptureError::Format {
            path: path.into(),
            packet: 0,
            source,
        };
        let inner = if n == 4 && magic == PCAPNG_MAGIC {
            Inner::PcapNg(Box::new(
                PcapNgReader::new(BufReader::new(open()?)).map_err(fmt)?,
            ))
        } else {
            let r = PcapReader::new(BufReader::new(open()?)).map_err(fmt)?;
            let link = r.header().datalink;
            check_link(path, link)?;
            Inner::Pcap(r, link)
        };
        Ok(Self {
            path: path.into(),
            inner,
            ifaces: Vec::new(),
            count: 0,
        })
    }

    /// Interface names, by index (pcapng `if_name`, else `ifN`).
    pub fn iface_name(&self, i: u32) -> String {
        self.ifaces
            .get(i as usize)
            .map_or_else(|| format!("if{i}"), |f| f.2.clone())
    }

    fn format_error(&self, source: PcapError) -> CaptureError {
        CaptureError::Format {
            path: self.path.clone(),
            packet: self.count + 1,
            source,
        }
    }
}

fn check_link(path: &Path, link: DataLink) -> Result<(), CaptureError> {
    match link {
        DataLink::ETHERNET
        | DataLink::LINUX_SLL
        | DataLink::LINUX_SLL2
        | DataLink::RAW
        | DataLink::IPV4
        | DataLink::IPV6
        | DataLink::NULL
        | DataLink::LOOP => Ok(()),
        DataLink::Unknown(12 | 14) => Ok(()),
        link => Err(CaptureError::Link {
            path: path.into(),
            link,
        }),
    }
}

/// Converts a pcapng timestamp in interface units to nanoseconds. `if_tsresol`:
/// bit 7 clear, 10^-n s per unit; set, 2^-n s; absent, microseconds. Integer
/// arithmetic: Unix times in ns do not fit an f64's 53-bit mantissa.
fn units_to_ns(raw: u64, tsresol: Option<u8>) -> u64 {
    let raw = u128::from(raw);
    let ns = match tsresol.unwrap_or(6) {
        r if r & 0x80 == 0 && r <= 9 => raw * 10u128.pow(9 - u32::from(r)),
        r if r & 0x80 == 0 => raw / 10u128.pow(u32::from(r) - 9),
        r => (raw * 1_000_000_000) >> u32::from(r & 0x7f).min(127),
    };
    ns as u64
}

impl Iterator for Capture {
    type Item = Result<Packet, CaptureError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (ts_ns, iface, link, data) = match &mut self.inner {
                Inner::Pcap(r, link) => {
                    let link = *link;
                    match r.next_packet()? {
                        Ok(p) => (p.timestamp.as_nanos() as u64, 0, link, p.data.into_owned()),
                        Err(e) => return Some(Err(self.format_error(e))),
                    }
                }
                Inner::PcapNg(r) => match r.next_block()? {
                    Err(e) => return Some(Err(self.format_error(e))),
                    Ok(Block::InterfaceDescription(idb)) => {
                        let mut res = None;
                        let mut name = None;
                        for o in &idb.options {
                            match o {
                                InterfaceDescriptionOption::IfTsResol(r) => res = Some(*r),
                                InterfaceDescriptionOption::IfName(n) => name = Some(n.to_string()),
                                _ => {}
                            }
                        }
                        if let Err(e) = check_link(&self.path, idb.linktype) {
                            return Some(Err(e));
                        }
                        let i = self.ifaces.len();
                        self.ifaces.push((
                            idb.linktype,
                            res,
                            name.unwrap_or_else(|| format!("if{i}")),
                        ));
                        continue;
                    }
                    Ok(Block::EnhancedPacket(p)) => {
                        let Some(&(link, tsresol, _)) = self.ifaces.get(p.interface_id as usize)
                        else {
                            return Some(Err(self.format_error(PcapError::InvalidField(
                                "packet names an undeclared interface",
                            ))));
                        };
                        // pcap-file reads the raw timestamp as nanoseconds; rescale it.
                        let ts = units_to_ns(p.timestamp.as_nanos() as u64, tsresol);
                        (ts, p.interface_id, link, p.data.into_owned())
                    }
                    Ok(Block::SimplePacket(p)) => {
                        let Some(&(link, _, _)) = self.ifaces.first() else {
                            continue;
                        };
                        (0, 0, link, p.data.into_owned())
                    }
                    Ok(_) => continue,
                },
            };
            self.count += 1;
            return Some(Ok(Packet {
                ts_ns,
                iface,
                frame: to_ethernet(link, data),
            }));
        }
    }
}

const ETH_P_IPV4: [u8; 2] = [0x08, 0x00];
const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];

/// The frame with an Ethernet header in place of the capture's link header.
/// A link header too short to read gives a frame too short to parse, so the
/// packet is counted as malformed, never dropped.
pub fn to_ethernet(link: DataLink, data: Vec<u8>) -> Vec<u8> {
    let with_type = |ethertype: [u8; 2], payload: &[u8]| {
        let mut f = Vec::with_capacity(14 + payload.len());
        f.extend_from_slice(&[0; 12]);
        f.extend_from_slice(&ethertype);
        f.extend_from_slice(payload);
        f
    };
    let by_version = |payload: &[u8]| match payload.first().map(|b| b >> 4) {
        Some(4) => with_type(ETH_P_IPV4, payload),
        Some(6) => with_type(ETH_P_IPV6, payload),
        // Nothing at all: too short to parse, so it counts as malformed.
        None => Vec::new(),
        // Not IP: an unknown ethertype, so it counts as non-TCP.
        Some(_) => with_type([0x88, 0xb5], payload),
    };
    match link {
        DataLink::ETHERNET => data,
        DataLink::LINUX_SLL if data.len() >= 16 => with_type([data[14], data[15]], &data[16..]),
        DataLink::LINUX_SLL2 if data.len() >= 20 => with_type([data[0], data[1]], &data[20..]),
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 | DataLink::Unknown(12 | 14) => {
            by_version(&data)
        }
        // BSD loopback: a 4-byte address family (host order for NULL,
        // network order for LOOP), then the IP packet.
        DataLink::NULL | DataLink::LOOP if data.len() >= 4 => by_version(&data[4..]),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cooked_and_raw_links_become_ethernet() {
        let ip = vec![0x45, 0, 0, 20];
        let mut sll = vec![0u8; 14];
        sll.extend_from_slice(&[0x08, 0x00]);
        sll.extend_from_slice(&ip);
        let eth = to_ethernet(DataLink::LINUX_SLL, sll);
        assert_eq!(&eth[12..], &[0x08, 0x00, 0x45, 0, 0, 20]);
        let mut sll2 = vec![0x86, 0xdd];
        sll2.extend_from_slice(&[0; 18]);
        sll2.extend_from_slice(&[0x60, 1]);
        assert_eq!(
            &to_ethernet(DataLink::LINUX_SLL2, sll2)[12..],
            &[0x86, 0xdd, 0x60, 1]
        );
        assert_eq!(
            &to_ethernet(DataLink::RAW, vec![0x60, 2])[12..],
            &[0x86, 0xdd, 0x60, 2]
        );
        assert_eq!(
            &to_ethernet(DataLink::NULL, vec![2, 0, 0, 0, 0x45, 3])[12..],
            &[0x08, 0x00, 0x45, 3]
        );
    }

    #[test]
    fn short_link_headers_give_unparsable_frames() {
        assert!(to_ethernet(DataLink::LINUX_SLL, vec![0; 10]).is_empty());
        assert!(to_ethernet(DataLink::RAW, vec![]).is_empty());
    }

    #[test]
    fn pcapng_time_resolution() {
        let us = 1_795_238_293_976_263u64;
        assert_eq!(
            units_to_ns(us, None),
            us * 1000,
            "microseconds by default, exactly"
        );
        assert_eq!(units_to_ns(5, Some(9)), 5);
        assert_eq!(units_to_ns(5, Some(3)), 5_000_000);
        assert_eq!(units_to_ns(1024, Some(0x80 | 10)), 1_000_000_000);
        assert_eq!(units_to_ns(123_456, Some(12)), 123);
    }
}
