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
    #[error("{path} is not a readable pcap or pcapng file (packet {packet})")]
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
    /// Per pcapng interface: link type and the multiplier from timestamp units to ns.
    ifaces: Vec<(DataLink, f64, String)>,
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

/// pcapng `if_tsresol`: bit 7 clear, 10^-n s per unit; set, 2^-n. Default µs.
fn units_to_ns(tsresol: Option<u8>) -> f64 {
    match tsresol {
        None => 1_000.0,
        Some(r) if r & 0x80 == 0 => 10f64.powi(9 - i32::from(r)),
        Some(r) => 1e9 / 2f64.powi(i32::from(r & 0x7f)),
    }
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
                            units_to_ns(res),
                            name.unwrap_or_else(|| format!("if{i}")),
                        ));
                        continue;
                    }
                    Ok(Block::EnhancedPacket(p)) => {
                        let Some(&(link, scale, _)) = self.ifaces.get(p.interface_id as usize)
                        else {
                            return Some(Err(self.format_error(PcapError::InvalidField(
                                "packet names an undeclared interface",
                            ))));
                        };
                        // pcap-file reads the raw timestamp as nanoseconds; rescale it.
                        let ts = (p.timestamp.as_nanos() as f64 * scale) as u64;
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
        assert_eq!(units_to_ns(None), 1_000.0);
        assert_eq!(units_to_ns(Some(9)), 1.0);
        assert_eq!(units_to_ns(Some(3)), 1_000_000.0);
        assert_eq!(units_to_ns(Some(0x80 | 10)), 1e9 / 1024.0);
    }
}
