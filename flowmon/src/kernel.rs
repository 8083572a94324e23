//! Loads flowmon's eBPF object, attaches it to interfaces, and reads its maps.
//!
//! Everything that talks to the kernel's BPF subsystem sits here, behind
//! [`Kernel`]; the rest of the agent works on the plain values it returns.
//! Dropping a `Kernel` detaches every program it attached: the XDP and TCX
//! attachments are BPF links owned by their file descriptors.

use std::{io, process::Command};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode, tc},
};
use flowmon_common::{
    flow::{CONFIG_FLAG_LOG, Config, DEFAULT_MAX_FLOWS, FlowKey, FlowValue, RetiredFlow},
    stats::STAT_COUNT,
};

use crate::{caps, iface};

/// The eBPF object built by build.rs from flowmon-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flowmon"));

pub const XDP_PROGRAM: &str = "flowmon_xdp";
pub const TC_PROGRAM: &str = "flowmon_tc";
/// Do-nothing programs of the same types, for benchmarks.
pub const PASS_XDP_PROGRAM: &str = "flowmon_pass_xdp";
pub const PASS_TC_PROGRAM: &str = "flowmon_pass_tc";
const FLOWS_MAP: &str = "FLOWS";
const STATS_MAP: &str = "STATS";
const CONFIG_MAP: &str = "CONFIG";
const CLOSED_MAP: &str = "CLOSED";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "flowmon needs {} to load and attach eBPF programs: run it as root, or grant them with `setcap cap_bpf,cap_net_admin,cap_perfmon+ep <path to flowmon>`",
        .missing.join(", ")
    )]
    Privilege { missing: Vec<&'static str> },
    #[error("no interface named {iface:?} in this network namespace: `ip link` lists them")]
    UnknownInterface { iface: String },
    #[error(
        "interface {iface} already has an XDP program attached ({existing}): detach it (`ip link set dev {iface} xdp off`) or run with --replace-xdp"
    )]
    XdpInUse { iface: String, existing: String },
    #[error("loading flowmon's eBPF programs into the kernel failed")]
    Load(#[source] aya::EbpfError),
    #[error("{what} program on {iface} failed")]
    Attach {
        what: &'static str,
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("{call} on map {map} failed")]
    Syscall {
        call: &'static str,
        map: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("map {map} is missing from the eBPF object or has the wrong type")]
    MapMissing { map: &'static str },
    #[error("reading map {map} failed")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// How to attach the XDP program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpAttach {
    /// Native (driver) mode where the driver supports it, generic otherwise.
    #[default]
    Auto,
    Native,
    Generic,
}

/// Options fixed at load time.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Connections the flow table holds.
    pub max_flows: u32,
    /// Kernel-side debug logging through aya-log.
    pub kernel_log: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_flows: DEFAULT_MAX_FLOWS,
            kernel_log: false,
        }
    }
}

/// Where and how the programs were attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub iface: String,
    pub ifindex: u32,
    /// "native" or "generic".
    pub xdp_mode: &'static str,
}

/// Loaded programs and their maps.
pub struct Kernel {
    ebpf: Ebpf,
    closed: RingBuf<MapData>,
    config: Config,
    attached: Vec<Attached>,
}

impl Kernel {
    /// Loads (but does not attach) the programs.
    pub fn load(opts: LoadOptions) -> Result<Self, KernelError> {
        let missing = caps::missing();
        if !missing.is_empty() {
            return Err(KernelError::Privilege { missing });
        }
        raise_memlock_limit();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(FLOWS_MAP, opts.max_flows)
            .load(OBJECT)
            .map_err(KernelError::Load)?;
        for name in [XDP_PROGRAM, TC_PROGRAM] {
            let prog = ebpf
                .program_mut(name)
                .expect("program compiled into the object");
            let res = match prog {
                aya::programs::Program::Xdp(p) => p.load(),
                aya::programs::Program::SchedClassifier(p) => p.load(),
                _ => unreachable!("flowmon has only XDP and TC programs"),
            };
            res.map_err(|e| KernelError::Load(aya::EbpfError::ProgramError(e)))?;
        }
        let closed = ebpf
            .take_map(CLOSED_MAP)
            .and_then(|m| RingBuf::try_from(m).ok())
            .ok_or(KernelError::MapMissing { map: CLOSED_MAP })?;
        let mut kernel = Self {
            ebpf,
            closed,
            config: Config::default(),
            attached: Vec::new(),
        };
        if opts.kernel_log {
            kernel.config.flags |= CONFIG_FLAG_LOG;
        }
        kernel.write_config()?;
        Ok(kernel)
    }

    /// The interfaces attached so far.
    pub fn attached(&self) -> &[Attached] {
        &self.attached
    }

    /// Attaches XDP (ingress) and TC egress to `name`.
    pub fn attach(
        &mut self,
        name: &str,
        mode: XdpAttach,
        replace: bool,
    ) -> Result<Attached, KernelError> {
        let ifindex = iface::index(name).ok_or_else(|| KernelError::UnknownInterface {
            iface: name.to_string(),
        })?;
        let xdp_mode = self.attach_xdp(name, ifindex, mode, replace)?;
        // Before TCX (Linux 6.6) TC programs hang off a clsact qdisc; an
        // existing one is fine. With TCX nothing is created, so nothing stays.
        let tcx = aya::util::KernelVersion::new(6, 6, 0);
        if aya::util::KernelVersion::current().is_ok_and(|v| v < tcx) {
            let _ = tc::qdisc_add_clsact(ifindex);
        }
        let prog: &mut SchedClassifier = self.program_mut(TC_PROGRAM)?;
        prog.attach(ifindex, TcAttachType::Egress)
            .map_err(|source| KernelError::Attach {
                what: "attaching the TC egress",
                iface: name.to_string(),
                source,
            })?;
        let a = Attached {
            iface: name.to_string(),
            ifindex,
            xdp_mode,
        };
        self.attached.push(a.clone());
        Ok(a)
    }

    fn attach_xdp(
        &mut self,
        name: &str,
        ifindex: u32,
        mode: XdpAttach,
        replace: bool,
    ) -> Result<&'static str, KernelError> {
        let tries: &[(XdpMode, &'static str)] = match mode {
            XdpAttach::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
            XdpAttach::Native => &[(XdpMode::Driver, "native")],
            XdpAttach::Generic => &[(XdpMode::Skb, "generic")],
        };
        let mut replaced = false;
        let mut last = None;
        let mut i = 0;
        while i < tries.len() {
            let (m, label) = tries[i];
            let prog: &mut Xdp = self.program_mut(XDP_PROGRAM)?;
            match prog.attach(ifindex, m) {
                Ok(_) => return Ok(label),
                Err(e) if errno(&e) == Some(libc::EBUSY) || errno(&e) == Some(libc::EEXIST) => {
                    let existing = existing_xdp(name).unwrap_or_else(|| "unknown program".into());
                    if !replace || replaced {
                        return Err(KernelError::XdpInUse {
                            iface: name.to_string(),
                            existing,
                        });
                    }
                    remove_xdp(name);
                    replaced = true;
                    continue;
                }
                Err(e) => last = Some(e),
            }
            i += 1;
        }
        Err(KernelError::Attach {
            what: "attaching the XDP",
            iface: name.to_string(),
            source: last.expect("at least one mode tried"),
        })
    }

    fn program_mut<'a, T>(&'a mut self, name: &'static str) -> Result<&'a mut T, KernelError>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program>,
    {
        self.ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .ok_or(KernelError::MapMissing { map: name })
    }

    /// The XDP program, for `BPF_PROG_TEST_RUN`.
    pub fn xdp(&self) -> &Xdp {
        self.ebpf
            .program(XDP_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .expect("XDP program in the object")
    }

    /// The TC program, for `BPF_PROG_TEST_RUN`.
    pub fn tc(&self) -> &SchedClassifier {
        self.ebpf
            .program(TC_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .expect("TC program in the object")
    }

    /// Loads the do-nothing baseline programs (benchmarks only) and returns them.
    pub fn baselines(&mut self) -> Result<(&Xdp, &SchedClassifier), KernelError> {
        let xdp: &mut Xdp = self.program_mut(PASS_XDP_PROGRAM)?;
        if xdp.fd().is_err() {
            xdp.load()
                .map_err(|e| KernelError::Load(aya::EbpfError::ProgramError(e)))?;
        }
        let tc: &mut SchedClassifier = self.program_mut(PASS_TC_PROGRAM)?;
        if tc.fd().is_err() {
            tc.load()
                .map_err(|e| KernelError::Load(aya::EbpfError::ProgramError(e)))?;
        }
        let x = self
            .ebpf
            .program(PASS_XDP_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .expect("loaded above");
        let t = self
            .ebpf
            .program(PASS_TC_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .expect("loaded above");
        Ok((x, t))
    }

    /// Inserts an entry from user space (benchmarks fill the table this way).
    pub fn insert_flow(&mut self, key: &FlowKey, value: &FlowValue) -> Result<(), KernelError> {
        let map = self
            .ebpf
            .map_mut(FLOWS_MAP)
            .ok_or(KernelError::MapMissing { map: FLOWS_MAP })?;
        let mut table: HashMap<&mut MapData, FlowKey, FlowValue> =
            HashMap::try_from(map).map_err(|source| KernelError::Map {
                map: FLOWS_MAP,
                source,
            })?;
        table
            .insert(key, value, 0)
            .map_err(|source| KernelError::Map {
                map: FLOWS_MAP,
                source,
            })
    }

    /// Kernel memory charged to the flow table (the `memlock` of its fd).
    pub fn flow_table_bytes(&self) -> Option<u64> {
        let Some(aya::maps::Map::LruHashMap(data)) = self.ebpf.map(FLOWS_MAP) else {
            return None;
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(data.fd()));
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Makes the programs use `ns` as the packet time instead of the kernel
    /// clock (0 returns to the kernel clock). `flowmon replay` uses it.
    pub fn set_clock_override(&mut self, ns: u64) -> Result<(), KernelError> {
        self.config.clock_override_ns = ns;
        self.write_config()
    }

    fn write_config(&mut self) -> Result<(), KernelError> {
        let map = self
            .ebpf
            .map_mut(CONFIG_MAP)
            .ok_or(KernelError::MapMissing { map: CONFIG_MAP })?;
        let mut arr: Array<&mut MapData, Config> =
            Array::try_from(map).map_err(|source| KernelError::Map {
                map: CONFIG_MAP,
                source,
            })?;
        arr.set(0, &self.config, 0)
            .map_err(|source| KernelError::Map {
                map: CONFIG_MAP,
                source,
            })
    }

    /// Every entry of the flow table, read in batches of 4096 entries per
    /// syscall where the kernel supports it (5.6+), else key by key.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>, KernelError> {
        let Some(aya::maps::Map::LruHashMap(data)) = self.ebpf.map(FLOWS_MAP) else {
            return Err(KernelError::MapMissing { map: FLOWS_MAP });
        };
        match crate::bpfsys::lookup_batch(std::os::fd::AsFd::as_fd(data.fd()), 4096) {
            Ok(v) => Ok(v),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
                ) =>
            {
                self.flows_one_by_one()
            }
            Err(source) => Err(KernelError::Syscall {
                call: "BPF_MAP_LOOKUP_BATCH",
                map: FLOWS_MAP,
                source,
            }),
        }
    }

    /// Every entry of the flow table, two syscalls per entry (aya's
    /// iterator). Entries that vanish while the table is walked (LRU
    /// eviction) are skipped, not reported as errors.
    pub fn flows_one_by_one(&self) -> Result<Vec<(FlowKey, FlowValue)>, KernelError> {
        let map = self
            .ebpf
            .map(FLOWS_MAP)
            .ok_or(KernelError::MapMissing { map: FLOWS_MAP })?;
        let table: HashMap<&MapData, FlowKey, FlowValue> =
            HashMap::try_from(map).map_err(|source| KernelError::Map {
                map: FLOWS_MAP,
                source,
            })?;
        let mut out = Vec::new();
        for entry in table.iter() {
            match entry {
                Ok(kv) => out.push(kv),
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(source) => {
                    return Err(KernelError::Map {
                        map: FLOWS_MAP,
                        source,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Removes the entry for `key` and returns its final value, atomically
    /// (see [`crate::bpfsys::lookup_and_delete`]); `None` if it is gone.
    pub fn take_flow(&self, key: &FlowKey) -> Result<Option<FlowValue>, KernelError> {
        let Some(aya::maps::Map::LruHashMap(data)) = self.ebpf.map(FLOWS_MAP) else {
            return Err(KernelError::MapMissing { map: FLOWS_MAP });
        };
        crate::bpfsys::lookup_and_delete(std::os::fd::AsFd::as_fd(data.fd()), key).map_err(
            |source| KernelError::Syscall {
                call: "BPF_MAP_LOOKUP_AND_DELETE_ELEM",
                map: FLOWS_MAP,
                source,
            },
        )
    }

    /// Puts `value` back under `key` after a [`Kernel::take_flow`] removed the
    /// wrong lifetime. Packets that arrived in between started a new entry;
    /// it is taken and merged in, until the insert lands in an empty slot.
    pub fn restore_flow(&self, key: &FlowKey, mut value: FlowValue) -> Result<(), KernelError> {
        let Some(aya::maps::Map::LruHashMap(data)) = self.ebpf.map(FLOWS_MAP) else {
            return Err(KernelError::MapMissing { map: FLOWS_MAP });
        };
        let fd = std::os::fd::AsFd::as_fd(data.fd());
        loop {
            match crate::bpfsys::insert_new(fd, key, &value) {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    if let Some(newer) = self.take_flow(key)? {
                        value.merge(&newer);
                    }
                }
                Err(source) => {
                    return Err(KernelError::Syscall {
                        call: "BPF_MAP_UPDATE_ELEM",
                        map: FLOWS_MAP,
                        source,
                    });
                }
            }
        }
    }

    /// Connections the programs retired because a new connection started on
    /// their tuple, oldest first.
    pub fn drain_retired(&mut self) -> Result<Vec<(FlowKey, FlowValue)>, KernelError> {
        let mut out = Vec::new();
        while let Some(item) = self.closed.next() {
            if item.len() < std::mem::size_of::<RetiredFlow>() {
                continue;
            }
            // Safety: the programs write whole RetiredFlow records, a plain
            // repr(C) type valid for any bytes; read unaligned from the item.
            let r = unsafe { item.as_ptr().cast::<RetiredFlow>().read_unaligned() };
            out.push((r.key, r.value));
        }
        Ok(out)
    }

    /// The global counters, summed over CPUs, indexed by `flowmon_common::stats`.
    pub fn stats(&self) -> Result<[u64; STAT_COUNT as usize], KernelError> {
        let map = self
            .ebpf
            .map(STATS_MAP)
            .ok_or(KernelError::MapMissing { map: STATS_MAP })?;
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|source| KernelError::Map {
                map: STATS_MAP,
                source,
            })?;
        let mut out = [0u64; STAT_COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let per_cpu = arr.get(&(i as u32), 0).map_err(|source| KernelError::Map {
                map: STATS_MAP,
                source,
            })?;
            *slot = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// Starts forwarding kernel-side log lines to the `log` crate.
    pub fn kernel_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).ok()
    }
}

fn errno(e: &ProgramError) -> Option<i32> {
    match e {
        ProgramError::SyscallError(s) => s.io_error.raw_os_error(),
        ProgramError::XdpError(aya::programs::xdp::XdpError::NetlinkError(n)) => {
            std::error::Error::source(n)
                .and_then(|s| s.downcast_ref::<io::Error>())
                .and_then(io::Error::raw_os_error)
        }
        _ => None,
    }
}

/// Names the XDP program already on `iface`, from iproute2's JSON.
fn existing_xdp(iface: &str) -> Option<String> {
    let out = Command::new("ip")
        .args(["-j", "-d", "link", "show", "dev", iface])
        .output()
        .ok()?;
    existing_xdp_from_json(&out.stdout)
}

/// The pure part of [`existing_xdp`].
pub fn existing_xdp_from_json(json: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(json).ok()?;
    let xdp = v.get(0)?.get("xdp")?;
    let prog = xdp
        .get("prog")
        .or_else(|| xdp.get("attached")?.get(0)?.get("prog"))?;
    let id = prog.get("id")?.as_u64()?;
    let name = prog.get("name").and_then(|n| n.as_str()).unwrap_or("?");
    Some(format!("program {name:?}, id {id}"))
}

/// Removes a netlink-attached XDP program in every mode. A program attached
/// through a BPF link cannot be removed this way, and the retry then reports it.
fn remove_xdp(iface: &str) {
    for mode in ["xdp", "xdpgeneric", "xdpdrv"] {
        let _ = Command::new("ip")
            .args(["link", "set", "dev", iface, mode, "off"])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so a large
/// flow table loads there too. Newer kernels use memory cgroups and ignore it.
fn raise_memlock_limit() {
    let r = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // Safety: plain syscall with a valid pointer.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_an_attached_xdp_program() {
        let json = br#"[{"ifindex":2,"ifname":"eth0","xdp":{"mode":1,"prog":{"id":42,"name":"xdp_dummy","tag":"ab"}}}]"#;
        assert_eq!(
            existing_xdp_from_json(json).as_deref(),
            Some(r#"program "xdp_dummy", id 42"#)
        );
        let multi = br#"[{"xdp":{"mode":3,"attached":[{"mode":1,"prog":{"id":7,"name":"x"}}]}}]"#;
        assert_eq!(
            existing_xdp_from_json(multi).as_deref(),
            Some(r#"program "x", id 7"#)
        );
        assert_eq!(existing_xdp_from_json(br#"[{"ifname":"lo"}]"#), None);
    }
}
