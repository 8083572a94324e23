//! Loads flowmon's eBPF object, attaches it to interfaces, and reads its maps.
//!
//! Everything that talks to the kernel's BPF subsystem sits here, behind
//! [`Kernel`]; the rest of the agent works on the plain values it returns.
//! Dropping a `Kernel` detaches every program it attached: the XDP and TCX
//! attachments are BPF links owned by their file descriptors.

use std::{
    io,
    path::{Path, PathBuf},
    process::Command,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, TestRun as _, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc,
    },
};
use flowmon_common::{
    flow::{
        CLOSED_FINISHED, CONFIG_FLAG_HAND_OVER, CONFIG_FLAG_LOG, Config, DEFAULT_MAX_FLOWS,
        FlowKey, FlowValue, RetiredFlow, TAKE_ABSENT, TAKE_BATCH, TAKE_PENDING, TAKE_REMOVED,
        TAKE_REPLACED, TakeBatch,
    },
    stats::{
        CpuState, STAT_COUNT, STAT_FRAGMENTS, STAT_MALFORMED, STAT_NON_TCP, STAT_PACKETS, STAT_TCP,
    },
    table::{Seeds, TABLE_LAYOUT, buckets_for},
};

use crate::{caps, flowtable::FlowTable, iface, prefetch};

/// The eBPF object built by build.rs from flowmon-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flowmon"));

pub const XDP_PROGRAM: &str = "flowmon_xdp";
pub const TC_PROGRAM: &str = "flowmon_tc";
/// Do-nothing programs of the same types, for benchmarks.
pub const PASS_XDP_PROGRAM: &str = "flowmon_pass_xdp";
/// Reads jiffies and the clock together, to calibrate the coarse clock.
pub const CLOCK_PROGRAM: &str = "flowmon_clock";
pub const PASS_TC_PROGRAM: &str = "flowmon_pass_tc";
/// Takes finished connections out of the flow table, a batch per test run.
const TAKE_PROGRAM: &str = "flowmon_take";
const BUCKETS_MAP: &str = "BUCKETS";
const STATS_MAP: &str = "STATS";
/// The programs' global `CONFIG`: the loader makes its section a one-entry
/// array map of that name. Pinned as [`CONFIG_PIN`], the name the map had
/// when it was declared as one, so tables pinned then still resume.
const CONFIG_MAP: &str = ".data.config";
const CONFIG_GLOBAL: &str = "CONFIG";
const CONFIG_PIN: &str = "CONFIG";
const CLOSED_MAP: &str = "CLOSED";
const DIRTY_MAP: &str = "DIRTY";
const TAKE_MAP: &str = "TAKE";

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
    #[error(
        "this kernel is Linux {found}: flowmon needs {}.{} or later (its flow table's locks use BPF compare-and-exchange); run it on a newer kernel",
        MIN_KERNEL.0,
        MIN_KERNEL.1
    )]
    KernelTooOld { found: String },
    #[error("{what} program on {iface} failed")]
    Attach {
        what: &'static str,
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("running {program} failed")]
    TestRun {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error(
        "the kernel would not run flowmon's clock program (BPF_PROG_TEST_RUN of an XDP program), which the programs need to time packets: check that nothing (a seccomp or LSM policy) filters the bpf() call"
    )]
    Clock,
    #[error("{call} on map {map} failed")]
    Syscall {
        call: &'static str,
        map: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} is not on a BPF filesystem, where pins live: mount one (`mount -t bpf bpf /sys/fs/bpf`) or choose another --pin-dir",
        .dir.display()
    )]
    NotBpffs { dir: PathBuf },
    #[error("cannot create the pin directory {}", .path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the maps pinned in {} do not match this flowmon (another version, or another --max-flows): run `flowmon detach` to remove them, then start again",
        .dir.display()
    )]
    PinnedMismatch {
        dir: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "the flow table pinned in {} was laid out by another flowmon version (layout {found}, this one reads {TABLE_LAYOUT}): run `flowmon detach` to remove it, then start again",
        .dir.display()
    )]
    PinnedLayout { dir: PathBuf, found: u32 },
    #[error("pinning {what} link on {iface} failed: {reason}")]
    PinLink {
        what: &'static str,
        iface: String,
        reason: String,
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

/// How to attach the XDP program, or where else to count received packets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpAttach {
    /// Native (driver) mode where the driver supports it, generic otherwise.
    #[default]
    Auto,
    Native,
    Generic,
    /// No XDP program: the TC program counts received packets at ingress
    /// too. Cheaper on veth and other virtual interfaces, where an XDP
    /// program moves receiving to NAPI and copies packets without XDP's
    /// headroom (docs/performance.md).
    Tc,
}

/// The link that counts an interface's received packets.
enum IngressLink {
    Xdp(aya::programs::xdp::XdpLinkId),
    Tc(aya::programs::tc::SchedClassifierLinkId),
}

/// Where an interface's links are pinned: XDP or TC ingress, and TC egress.
struct LinkPins {
    xdp: PathBuf,
    tc_ingress: PathBuf,
    tc: PathBuf,
}

/// Options fixed at load time.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Connections the flow table holds.
    pub max_flows: u32,
    /// Kernel-side debug logging through aya-log.
    pub kernel_log: bool,
    /// Pin the maps and links in this bpffs directory, reusing what an
    /// earlier agent pinned there, so counting goes on while no agent runs.
    pub pin: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_flows: DEFAULT_MAX_FLOWS,
            kernel_log: false,
            pin: None,
        }
    }
}

/// [`Attached::xdp_mode`] of an interface whose received packets TC counts.
pub const TC_INGRESS: &str = "tc-ingress";

/// The hooks an interface attached with `xdp_mode` counts at, as the
/// banner and `flowmon status` name them.
pub fn hooks(xdp_mode: &str) -> String {
    match xdp_mode {
        TC_INGRESS => "TC ingress and egress".to_string(),
        mode => format!("XDP {mode}, TC egress"),
    }
}

fn pin_error(what: &'static str, iface: &str, reason: impl ToString) -> KernelError {
    KernelError::PinLink {
        what,
        iface: iface.to_string(),
        reason: reason.to_string(),
    }
}

/// Where `flowmon run --persist` pins by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/flowmon";

/// The maps that carry state across agents (the rest are per-program
/// scratch): each map's name and the file it is pinned as.
const PINNED_MAPS: [(&str, &str); 5] = [
    (BUCKETS_MAP, BUCKETS_MAP),
    (STATS_MAP, STATS_MAP),
    (CLOSED_MAP, CLOSED_MAP),
    (CONFIG_MAP, CONFIG_PIN),
    (DIRTY_MAP, DIRTY_MAP),
];

/// Every file a map may be pinned as, this version's and earlier ones'.
fn pin_files() -> impl Iterator<Item = &'static str> {
    PINNED_MAPS
        .iter()
        .map(|&(_, pin)| pin)
        .chain(LEGACY_PINNED_MAPS)
}

/// Maps earlier versions pinned (the LRU hash flow table, then the slots
/// apart from their buckets), which `detach` removes too.
const LEGACY_PINNED_MAPS: [&str; 2] = ["FLOWS", "SLOTS"];

/// Where and how the programs were attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub iface: String,
    pub ifindex: u32,
    /// The XDP program's mode, "native" or "generic"; [`TC_INGRESS`] when
    /// TC counts received packets; "pinned" when an earlier agent's links
    /// were kept.
    pub xdp_mode: &'static str,
}

/// Loaded programs and their maps.
pub struct Kernel {
    ebpf: Ebpf,
    closed: RingBuf<MapData>,
    dirty: RingBuf<MapData>,
    config: Config,
    attached: Vec<Attached>,
    pin: Option<PathBuf>,
    /// Whether the maps were already pinned by an earlier agent.
    resumed: bool,
    /// Pinned links: dropping these leaves the programs attached.
    pinned_links: Vec<PinnedLink>,
    /// The flow table, mapped.
    table: FlowTable,
    /// Entries [`Kernel::insert_flow`] put in the table, which the
    /// programs' count of the entries they created leaves out.
    user_inserted: u64,
    /// The take program's batch, mapped here.
    take: std::sync::Mutex<crate::bpfsys::Mapped<TakeBatch>>,
}

/// Entries read from a part of the table, and the bucket to go on from
/// (`None`: the table's end).
pub type Slice = (Vec<(FlowKey, FlowValue)>, Option<u64>);

/// What [`Kernel::take_flows`] found under one key.
#[expect(
    clippy::large_enum_variant,
    reason = "handed over by value from the take's batch: a Box each would be an allocation per connection"
)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    /// No entry.
    Absent,
    /// A later connection on the tuple (the one read was retired to the
    /// CLOSED ring), or a SYN counted since the read: left in the table.
    Replaced,
    /// The final value, removed from the table.
    Removed(FlowValue),
}

impl Kernel {
    /// Loads (but does not attach) the programs.
    pub fn load(opts: LoadOptions) -> Result<Self, KernelError> {
        let missing = caps::missing();
        if !missing.is_empty() {
            return Err(KernelError::Privilege { missing });
        }
        if let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            && kernel_version(&release).is_some_and(|v| v < MIN_KERNEL)
        {
            return Err(KernelError::KernelTooOld {
                found: release.trim().to_string(),
            });
        }
        raise_memlock_limit();
        // A pinned table's config, read before loading: loading writes a
        // global's initial value into its map, pinned or not.
        let mut pinned: Option<Config> = None;
        let mut loader = EbpfLoader::new();
        let buckets = buckets_for(opts.max_flows);
        loader.map_max_entries(BUCKETS_MAP, buckets);
        let mut resumed = false;
        if let Some(dir) = &opts.pin {
            if !on_bpffs(dir) {
                return Err(KernelError::NotBpffs { dir: dir.clone() });
            }
            std::fs::create_dir_all(dir.join("links")).map_err(|source| KernelError::Pin {
                path: dir.clone(),
                source,
            })?;
            // Any map pinned, this version's or an earlier one's: a
            // mismatch is then reported with the advice to detach.
            resumed = pin_files().any(|m| dir.join(m).exists());
            for (name, pin) in PINNED_MAPS {
                loader.map_pin_path(name, dir.join(pin));
            }
            // Given as the global's initial value, so that the table keeps
            // its seed, size and removals. An unreadable one (absent, or of
            // another layout) is left to the load, which then reports the
            // mismatch, or to the layout check below.
            pinned = read_pinned_config(&dir.join(CONFIG_PIN)).ok();
            if let Some(c) = &pinned {
                loader.override_global(CONFIG_GLOBAL, c, true);
            }
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| match (&opts.pin, e) {
            (Some(dir), aya::EbpfError::MapError(source)) if resumed => {
                KernelError::PinnedMismatch {
                    dir: dir.clone(),
                    source,
                }
            }
            (_, e) => KernelError::Load(e),
        })?;
        for name in [XDP_PROGRAM, TC_PROGRAM, TAKE_PROGRAM] {
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
        let dirty = ebpf
            .take_map(DIRTY_MAP)
            .and_then(|m| RingBuf::try_from(m).ok())
            .ok_or(KernelError::MapMissing { map: DIRTY_MAP })?;
        let take = match ebpf.map(TAKE_MAP) {
            Some(aya::maps::Map::Array(data)) => crate::bpfsys::Mapped::new(
                std::os::fd::AsFd::as_fd(data.fd()),
            )
            .map_err(|source| KernelError::Syscall {
                call: "mmap",
                map: TAKE_MAP,
                source,
            })?,
            _ => return Err(KernelError::MapMissing { map: TAKE_MAP }),
        };
        let mut config = Config::default();
        if resumed {
            // Keep what the earlier agent recorded (its removals, the
            // table's seed and size).
            config = pinned.unwrap_or_default();
            if config.table_layout != TABLE_LAYOUT {
                return Err(KernelError::PinnedLayout {
                    dir: opts.pin.clone().unwrap_or_default(),
                    found: config.table_layout,
                });
            }
            config.flags &= !CONFIG_FLAG_LOG;
            // This agent starts by reading the whole table.
            config.epoch = 0;
        } else {
            config.seeds = Seeds::new(random_seed());
            config.table_layout = TABLE_LAYOUT;
            config.buckets = buckets;
            config.max_flows = opts.max_flows;
        }
        // A pinned table keeps its own size.
        let table = FlowTable::new(map_fd(&ebpf, BUCKETS_MAP)?, config.buckets, config.seeds)
            .map_err(|source| KernelError::Syscall {
                call: "mmap",
                map: BUCKETS_MAP,
                source,
            })?;
        let mut kernel = Self {
            ebpf,
            closed,
            dirty,
            config,
            attached: Vec::new(),
            pin: opts.pin.clone(),
            resumed,
            pinned_links: Vec::new(),
            table,
            user_inserted: 0,
            take: std::sync::Mutex::new(take),
        };
        if opts.kernel_log {
            kernel.config.flags |= CONFIG_FLAG_LOG;
        }
        let t = kernel.measure_ticks()?;
        (
            kernel.config.tick_ns,
            kernel.config.jiffies_at,
            kernel.config.jiffies_ns,
        ) = (t.tick_ns, t.jiffies_at, t.jiffies_ns);
        kernel.write_config()?;
        Ok(kernel)
    }

    /// Measures how jiffies map to the clock (see [`crate::ticks`]): the
    /// programs time packets by it and have no other clock.
    fn measure_ticks(&mut self) -> Result<crate::ticks::Ticks, KernelError> {
        let prog: &mut Xdp = self.program_mut(CLOCK_PROGRAM)?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(|e| KernelError::Load(aya::EbpfError::ProgramError(e)))?;
        }
        let t = crate::ticks::measure(prog);
        // Unloaded again: it is only needed here.
        let _ = prog.unload();
        t.ok_or(KernelError::Clock)
    }

    /// How the programs' coarse clock converts jiffies (measured at load).
    pub fn ticks(&self) -> crate::ticks::Ticks {
        let c = &self.config;
        crate::ticks::Ticks {
            tick_ns: c.tick_ns,
            jiffies_at: c.jiffies_at,
            jiffies_ns: c.jiffies_ns,
        }
    }

    /// Entries the flow table holds at most (`--max-flows`, or the pinned
    /// table's size).
    pub fn capacity(&self) -> u32 {
        self.config.max_flows
    }

    /// The interfaces attached so far.
    pub fn attached(&self) -> &[Attached] {
        &self.attached
    }

    /// Whether the maps came from an earlier agent's pins.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Entries removed by agents since the table was created (kept across
    /// restarts when pinned).
    pub fn agent_removed(&self) -> u64 {
        self.config.agent_removed
    }

    /// Records `n` more entries removed by the agent.
    pub fn add_agent_removed(&mut self, n: u64) -> Result<(), KernelError> {
        if n == 0 {
            return Ok(());
        }
        self.config.agent_removed += n;
        self.write_config()
    }

    fn link_paths(&self, ifindex: u32) -> Option<LinkPins> {
        let dir = self.pin.as_ref()?.join("links");
        Some(LinkPins {
            xdp: dir.join(format!("xdp-{ifindex}")),
            tc_ingress: dir.join(format!("tcin-{ifindex}")),
            tc: dir.join(format!("tc-{ifindex}")),
        })
    }

    /// Pins the links just attached to `name` (`ifindex`), so the programs
    /// stay attached after this process.
    fn pin_links(
        &mut self,
        name: &str,
        ingress: IngressLink,
        tc_link: aya::programs::tc::SchedClassifierLinkId,
        pins: LinkPins,
    ) -> Result<(), KernelError> {
        let not_tcx = "the TC link is not a BPF link: pinning needs TCX (Linux 6.6)";
        let (what, link, path) = match ingress {
            IngressLink::Xdp(id) => {
                let xdp: &mut Xdp = self.program_mut(XDP_PROGRAM)?;
                let link = xdp.take_link(id).map_err(|e| pin_error("XDP", name, e))?;
                let fd = FdLink::try_from(link).map_err(|e| pin_error("XDP", name, e))?;
                ("XDP", fd, pins.xdp)
            }
            IngressLink::Tc(id) => {
                let tc: &mut SchedClassifier = self.program_mut(TC_PROGRAM)?;
                let link = tc
                    .take_link(id)
                    .map_err(|e| pin_error("TC ingress", name, e))?;
                let fd =
                    FdLink::try_from(link).map_err(|_| pin_error("TC ingress", name, not_tcx))?;
                ("TC ingress", fd, pins.tc_ingress)
            }
        };
        let pinned = link.pin(&path).map_err(|e| pin_error(what, name, e))?;
        self.pinned_links.push(pinned);
        let tc: &mut SchedClassifier = self.program_mut(TC_PROGRAM)?;
        let link = tc
            .take_link(tc_link)
            .map_err(|e| pin_error("TC", name, e))?;
        let fd = FdLink::try_from(link).map_err(|_| pin_error("TC", name, not_tcx))?;
        let pinned = fd.pin(&pins.tc).map_err(|e| pin_error("TC", name, e))?;
        self.pinned_links.push(pinned);
        Ok(())
    }

    /// Attaches XDP (or TC, with [`XdpAttach::Tc`]) at ingress and TC at
    /// egress to `name`.
    pub fn attach(
        &mut self,
        name: &str,
        mode: XdpAttach,
        replace: bool,
    ) -> Result<Attached, KernelError> {
        let ifindex = iface::index(name).ok_or_else(|| KernelError::UnknownInterface {
            iface: name.to_string(),
        })?;
        let pins = self.link_paths(ifindex);
        if let Some(p) = &pins
            && let Some(ingress) = [&p.xdp, &p.tc_ingress].into_iter().find(|p| p.exists())
            && p.tc.exists()
        {
            // An earlier agent's programs are still attached and counting
            // into the pinned maps: keep them.
            for path in [ingress, &p.tc] {
                let link = PinnedLink::from_pin(path).map_err(|e| KernelError::PinLink {
                    what: "opening the pinned",
                    iface: name.to_string(),
                    reason: e.to_string(),
                })?;
                self.pinned_links.push(link);
            }
            let a = Attached {
                iface: name.to_string(),
                ifindex,
                xdp_mode: if ingress == &p.xdp {
                    "pinned"
                } else {
                    TC_INGRESS
                },
            };
            self.attached.push(a.clone());
            return Ok(a);
        }
        // Before TCX (Linux 6.6) TC programs hang off a clsact qdisc; an
        // existing one is fine. With TCX nothing is created, so nothing stays.
        let tcx = aya::util::KernelVersion::new(6, 6, 0);
        if aya::util::KernelVersion::current().is_ok_and(|v| v < tcx) {
            let _ = tc::qdisc_add_clsact(ifindex);
        }
        let (xdp_mode, ingress) = if mode == XdpAttach::Tc {
            let link = self.attach_tc(name, ifindex, TcAttachType::Ingress)?;
            (TC_INGRESS, IngressLink::Tc(link))
        } else {
            let (label, link) = self.attach_xdp(name, ifindex, mode, replace)?;
            (label, IngressLink::Xdp(link))
        };
        let tc_link = self.attach_tc(name, ifindex, TcAttachType::Egress)?;
        if let Some(pins) = pins {
            self.pin_links(name, ingress, tc_link, pins)?;
        }
        let a = Attached {
            iface: name.to_string(),
            ifindex,
            xdp_mode,
        };
        self.attached.push(a.clone());
        Ok(a)
    }

    fn attach_tc(
        &mut self,
        name: &str,
        ifindex: u32,
        at: TcAttachType,
    ) -> Result<aya::programs::tc::SchedClassifierLinkId, KernelError> {
        let prog: &mut SchedClassifier = self.program_mut(TC_PROGRAM)?;
        prog.attach(ifindex, at)
            .map_err(|source| KernelError::Attach {
                what: if at == TcAttachType::Ingress {
                    "attaching the TC ingress"
                } else {
                    "attaching the TC egress"
                },
                iface: name.to_string(),
                source,
            })
    }

    fn attach_xdp(
        &mut self,
        name: &str,
        ifindex: u32,
        mode: XdpAttach,
        replace: bool,
    ) -> Result<(&'static str, aya::programs::xdp::XdpLinkId), KernelError> {
        let tries: &[(XdpMode, &'static str)] = match mode {
            XdpAttach::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
            XdpAttach::Native => &[(XdpMode::Driver, "native")],
            XdpAttach::Generic => &[(XdpMode::Skb, "generic")],
            XdpAttach::Tc => unreachable!("TC ingress attaches no XDP program"),
        };
        let mut replaced = false;
        let mut last = None;
        let mut i = 0;
        while i < tries.len() {
            let (m, label) = tries[i];
            let prog: &mut Xdp = self.program_mut(XDP_PROGRAM)?;
            match prog.attach(ifindex, m) {
                Ok(link) => return Ok((label, link)),
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

    /// A program compiled into the object, by name and type.
    fn program<'a, T>(&'a self, name: &'static str) -> &'a T
    where
        &'a T: TryFrom<&'a aya::programs::Program>,
    {
        self.ebpf
            .program(name)
            .and_then(|p| p.try_into().ok())
            .unwrap_or_else(|| panic!("{name} is compiled into the object"))
    }

    /// The XDP program, for `BPF_PROG_TEST_RUN`.
    pub fn xdp(&self) -> &Xdp {
        self.program(XDP_PROGRAM)
    }

    /// The TC program, for `BPF_PROG_TEST_RUN`.
    pub fn tc(&self) -> &SchedClassifier {
        self.program(TC_PROGRAM)
    }

    /// The do-nothing XDP program, once [`Kernel::baselines`] loaded it.
    pub fn pass_xdp(&self) -> &Xdp {
        self.program(PASS_XDP_PROGRAM)
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
        Ok((self.pass_xdp(), self.program(PASS_TC_PROGRAM)))
    }

    /// Attaches the do-nothing XDP program to `name` in native mode
    /// (benchmarks only: what the XDP hook costs on its own, whatever the
    /// program does). Detached when the `Kernel` is dropped.
    pub fn attach_pass_xdp(&mut self, name: &str) -> Result<(), KernelError> {
        let ifindex = iface::index(name).ok_or_else(|| KernelError::UnknownInterface {
            iface: name.to_string(),
        })?;
        self.baselines()?;
        let prog: &mut Xdp = self.program_mut(PASS_XDP_PROGRAM)?;
        prog.attach(ifindex, XdpMode::Driver)
            .map_err(|source| KernelError::Attach {
                what: "attaching the do-nothing XDP",
                iface: name.to_string(),
                source,
            })?;
        Ok(())
    }

    /// Inserts an entry from user space (benchmarks fill the table this way).
    pub fn insert_flow(&mut self, key: &FlowKey, value: &FlowValue) -> Result<(), KernelError> {
        self.table.insert(key, value);
        self.user_inserted += 1;
        Ok(())
    }

    /// Entries [`Kernel::insert_flow`] put in the table.
    pub fn user_inserted(&self) -> u64 {
        self.user_inserted
    }

    /// Kernel memory charged to the flow table (the `memlock` of its map).
    pub fn flow_table_bytes(&self) -> Option<u64> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&map_fd(&self.ebpf, BUCKETS_MAP).ok()?);
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
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

    /// Every entry of the flow table, read in place.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>, KernelError> {
        self.flows_into(Vec::new(), 0)
    }

    /// Buckets in the flow table.
    pub fn buckets(&self) -> usize {
        self.table.buckets()
    }

    /// Appends the entries of buckets `from..to` to `out`.
    pub fn read_buckets(&self, from: usize, to: usize, out: &mut Vec<(FlowKey, FlowValue)>) {
        self.table.read_buckets(from, to, out);
    }

    /// [`Kernel::flows`] into `buf` (its allocation reused), reserving room
    /// for `expect` entries up front.
    pub fn flows_into(
        &self,
        mut buf: Vec<(FlowKey, FlowValue)>,
        expect: usize,
    ) -> Result<Vec<(FlowKey, FlowValue)>, KernelError> {
        buf.clear();
        buf.reserve(expect);
        self.table.read_buckets(0, self.table.buckets(), &mut buf);
        Ok(buf)
    }

    /// Removes the entry for `key` and returns its final value; `None` if it
    /// is gone. The agent takes batches with [`Kernel::take_flows`]; tests
    /// and benchmarks use this one.
    pub fn take_flow(&self, key: &FlowKey) -> Result<Option<FlowValue>, KernelError> {
        let Some(seen) = self.table.lookup(key) else {
            return Ok(None);
        };
        let mut seen = seen;
        // Whatever it holds now.
        seen.dir[0].first_ns = 0;
        seen.dir[1].first_ns = 0;
        Ok(match self.take_flows(&[(*key, seen)])?.pop() {
            Some(Taken::Removed(v)) => Some(v),
            _ => None,
        })
    }

    /// Takes the connections in `seen` (keys and the values read earlier)
    /// out of the table, [`TAKE_BATCH`] per run of the take program, and
    /// returns what was found for each, in order. An entry whose first
    /// times differ from the ones read is a later connection, and one that
    /// counted a SYN since may have become one: both stay.
    pub fn take_flows(&self, seen: &[(FlowKey, FlowValue)]) -> Result<Vec<Taken>, KernelError> {
        let mut out = Vec::with_capacity(seen.len());
        self.take_flows_each(seen, true, |_, t| out.push(t))?;
        Ok(out)
    }

    /// [`Kernel::take_flows`], handing `each` what was found for each entry
    /// of `seen` (its index, in order) straight from the batch: a list of
    /// them was written and read back for every connection, and a new one
    /// each poll had its pages faulted in again. `prefetch` starts loading
    /// the lines the take program reads first, for entries read a while ago
    /// ([`FlowTable::prefetch_takes`]).
    pub fn take_flows_each(
        &self,
        seen: &[(FlowKey, FlowValue)],
        prefetch: bool,
        mut each: impl FnMut(usize, Taken),
    ) -> Result<(), KernelError> {
        let prog: &SchedClassifier = self.program(TAKE_PROGRAM);
        let mut mapped = self.take.lock().unwrap_or_else(|e| e.into_inner());
        let mut index = 0;
        for chunk in seen.chunks(TAKE_BATCH) {
            let batch = mapped.get_mut();
            batch.next = 0;
            batch.count = chunk.len() as u32;
            for (slot, (key, value)) in batch.slots.iter_mut().zip(chunk) {
                slot.key = *key;
                slot.status = TAKE_PENDING;
                slot.seen_first_ns = [value.dir[0].first_ns, value.dir[1].first_ns];
                slot.seen_syn = value.dir[0].syn + value.dir[1].syn;
            }
            if prefetch {
                self.table.prefetch_takes(chunk.iter().map(|(k, _)| k));
            }
            // A test run stops early when a signal is pending; the program's
            // cursor says where it got to. No reference into the mapping
            // is held across a run, which writes it.
            loop {
                let left = {
                    let b = mapped.get_mut();
                    b.count - b.next
                };
                if left == 0 {
                    break;
                }
                let run = prog.test_run(TestRunOptions {
                    data_in: Some(&[0u8; 64]),
                    repeat: left,
                    ..Default::default()
                });
                if let Err(source) = run {
                    let b = mapped.get_mut();
                    if b.count - b.next == left {
                        return Err(KernelError::TestRun {
                            program: TAKE_PROGRAM,
                            source,
                        });
                    }
                }
            }
            let batch = mapped.get_mut();
            for s in &batch.slots[..chunk.len()] {
                each(
                    index,
                    match s.status {
                        TAKE_REMOVED => Taken::Removed(s.value),
                        TAKE_REPLACED => Taken::Replaced,
                        st => {
                            debug_assert!(st == TAKE_ABSENT, "take status {st}");
                            Taken::Absent
                        }
                    },
                );
                index += 1;
            }
        }
        Ok(())
    }

    /// The poll epoch the programs mark changed connections with (0:
    /// none, the agent reads the whole table).
    pub fn epoch(&self) -> u32 {
        self.config.epoch
    }

    pub fn set_epoch(&mut self, epoch: u32) -> Result<(), KernelError> {
        if self.config.epoch == epoch {
            return Ok(());
        }
        self.config.epoch = epoch;
        self.write_config()
    }

    /// Keys of the connections that saw packets since the epoch
    /// changed, possibly repeated.
    pub fn drain_dirty(&mut self) -> Vec<FlowKey> {
        drain(&mut self.dirty)
    }

    /// One entry, if present.
    pub fn lookup_flow(&self, key: &FlowKey) -> Result<Option<FlowValue>, KernelError> {
        Ok(self.table.lookup(key))
    }

    /// At least `want` entries from bucket `cursor` on (0 when `None`), in
    /// `out` (its allocation reused, as [`Kernel::flows_into`]), and the
    /// bucket to continue from; `None` when the end of the table was
    /// reached.
    pub fn flows_from(
        &self,
        mut out: Vec<(FlowKey, FlowValue)>,
        cursor: Option<u64>,
        want: usize,
    ) -> Result<Slice, KernelError> {
        out.clear();
        out.reserve(want);
        let mut b = cursor.unwrap_or(0) as usize;
        let n = self.table.buckets();
        while b < n && out.len() < want {
            let to = (b + 256).min(n);
            self.table.read_buckets(b, to, &mut out);
            b = to;
        }
        Ok((out, (b < n).then_some(b as u64)))
    }

    /// Connections the programs took out of the table, oldest first, each
    /// with whether its last packet handed it over ([`Kernel::hand_over`])
    /// rather than a new connection on its tuple retiring it.
    pub fn drain_closed(&mut self) -> Vec<(FlowKey, FlowValue, bool)> {
        let mut out = Vec::new();
        self.drain_closed_each(|k, v, handed| out.push((*k, *v, handed)));
        out
    }

    /// [`Kernel::drain_closed`], each connection given to `each` as it is
    /// read off the ring: a busy agent drains tens of thousands a second,
    /// and collecting them first copied each twice.
    pub fn drain_closed_each(&mut self, mut each: impl FnMut(&FlowKey, &FlowValue, bool)) {
        drain_each(&mut self.closed, |r: RetiredFlow| {
            each(&r.key, &r.value, r.kind == CLOSED_FINISHED)
        });
    }

    /// Has each whole connection's last packet hand it over on the CLOSED
    /// ring ([`Kernel::drain_closed`]) instead of leaving it in the table
    /// for a take: for an agent, which drains the ring every poll.
    pub fn hand_over(&mut self, on: bool) -> Result<(), KernelError> {
        if on {
            self.config.flags |= CONFIG_FLAG_HAND_OVER;
        } else {
            self.config.flags &= !CONFIG_FLAG_HAND_OVER;
        }
        self.write_config()
    }

    /// Connections the programs retired because a new connection started on
    /// their tuple, oldest first (all there are, without hand-over).
    pub fn drain_retired(&mut self) -> Result<Vec<(FlowKey, FlowValue)>, KernelError> {
        let mut out = Vec::new();
        self.drain_closed_each(|k, v, _| out.push((*k, *v)));
        Ok(out)
    }

    /// The global counters, summed over CPUs, indexed by `flowmon_common::stats`.
    pub fn stats(&self) -> Result<[u64; STAT_COUNT as usize], KernelError> {
        let map = self
            .ebpf
            .map(STATS_MAP)
            .ok_or(KernelError::MapMissing { map: STATS_MAP })?;
        let arr: PerCpuArray<&MapData, CpuState> =
            PerCpuArray::try_from(map).map_err(|source| KernelError::Map {
                map: STATS_MAP,
                source,
            })?;
        let per_cpu = arr.get(&0, 0).map_err(|source| KernelError::Map {
            map: STATS_MAP,
            source,
        })?;
        let mut out = [0u64; STAT_COUNT as usize];
        for cpu in per_cpu.iter() {
            for (total, n) in out.iter_mut().zip(cpu.stats) {
                *total += n;
            }
        }
        // Every packet lands in exactly one of these, so the programs do
        // not count packets separately.
        out[STAT_PACKETS as usize] = [STAT_TCP, STAT_NON_TCP, STAT_MALFORMED, STAT_FRAGMENTS]
            .iter()
            .map(|&i| out[i as usize])
            .sum();
        Ok(out)
    }

    /// Starts forwarding kernel-side log lines to the `log` crate.
    pub fn kernel_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).ok()
    }
}

/// The oldest kernel the programs load on (README, Requirements).
pub const MIN_KERNEL: (u32, u32) = (5, 12);

/// Major and minor version of a kernel release string ("6.18.44-fc-v445").
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The descriptor of map `name`, for mapping it.
fn map_fd<'a>(
    ebpf: &'a Ebpf,
    name: &'static str,
) -> Result<std::os::fd::BorrowedFd<'a>, KernelError> {
    match ebpf.map(name) {
        Some(aya::maps::Map::Array(data)) => Ok(std::os::fd::AsFd::as_fd(data.fd())),
        _ => Err(KernelError::MapMissing { map: name }),
    }
}

/// The config an earlier agent pinned at `path`.
fn read_pinned_config(path: &Path) -> Result<Config, aya::maps::MapError> {
    let map = aya::maps::MapData::from_pin(path)?;
    let arr: Array<_, Config> = Array::try_from(aya::maps::Map::Array(map))?;
    arr.get(&0, 0)
}

/// A random hash seed for a new table, from the standard library's
/// per-process random keys (no extra dependency for 64 bits).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.finish()
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

/// Whether `dir` (or, if it does not exist yet, its nearest existing parent)
/// is on a BPF filesystem.
#[allow(
    clippy::unnecessary_cast,
    reason = "the statfs type field is i64 on x86_64 but narrower on other targets"
)]
fn on_bpffs(dir: &std::path::Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    dir.ancestors()
        .find(|d| d.exists())
        .and_then(|d| nix::sys::statfs::statfs(d).ok())
        .is_some_and(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// Removes what `flowmon run --persist` left in `dir`: unpins the links
/// (which detaches the programs, as nothing else holds them) and the maps
/// (which frees them). Returns what was removed, for the user to see.
pub fn detach_pinned(dir: &std::path::Path) -> Result<Vec<String>, KernelError> {
    let mut removed = Vec::new();
    let links = dir.join("links");
    if let Ok(entries) = std::fs::read_dir(&links) {
        for e in entries.flatten() {
            let path = e.path();
            let link = PinnedLink::from_pin(&path).map_err(|e| KernelError::PinLink {
                what: "opening the pinned",
                iface: path.display().to_string(),
                reason: e.to_string(),
            })?;
            drop(link.unpin().map_err(|source| KernelError::Pin {
                path: path.clone(),
                source,
            })?);
            removed.push(format!("link {}", path.display()));
        }
        let _ = std::fs::remove_dir(&links);
    }
    for name in pin_files() {
        let path = dir.join(name);
        if path.exists() {
            std::fs::remove_file(&path).map_err(|source| KernelError::Pin {
                path: path.clone(),
                source,
            })?;
            removed.push(format!("map {}", path.display()));
        }
    }
    let _ = std::fs::remove_dir(dir);
    Ok(removed)
}

/// The records waiting in `ring`, oldest first. The programs write whole
/// `T` records; a shorter one (never written) is skipped.
fn drain<T: Copy>(ring: &mut RingBuf<MapData>) -> Vec<T> {
    let mut out = Vec::new();
    drain_each(ring, |t| out.push(t));
    out
}

/// Each record on `ring`, given to `each` as it is read off.
fn drain_each<T: Copy>(ring: &mut RingBuf<MapData>, mut each: impl FnMut(T)) {
    while let Some(item) = ring.next() {
        if item.len() < std::mem::size_of::<T>() {
            continue;
        }
        // The programs wrote the records on another CPU: each one's first
        // read waited for its lines (a tenth of a busy agent's time, in
        // the first use of its counters). The records of one type follow
        // each other in the ring, each after an 8-byte header and padded
        // to 8 bytes, so the one `AHEAD` on is asked for now. Past the
        // records written so far the hint is only wasted: a prefetch never
        // faults.
        let stride = item.len().next_multiple_of(8) + 8;
        prefetch::all(
            item.as_ptr()
                .wrapping_add(prefetch::AHEAD * stride)
                .cast::<T>(),
        );
        // Safety: T is a plain repr(C) type of the shared crate, valid for
        // any bytes; the item holds at least its size, read unaligned.
        each(unsafe { item.as_ptr().cast::<T>().read_unaligned() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kernel_versions_and_refuses_old_ones() {
        assert_eq!(kernel_version("6.18.44-fc-v445\n"), Some((6, 18)));
        assert_eq!(kernel_version("5.12-rc3"), Some((5, 12)));
        assert_eq!(kernel_version("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(kernel_version("garbage"), None);
        assert!(kernel_version("5.11.22").unwrap() < MIN_KERNEL);
        assert!(kernel_version("5.12.0").unwrap() >= MIN_KERNEL);
        let e = KernelError::KernelTooOld {
            found: "5.10.0".into(),
        };
        assert_eq!(
            e.to_string(),
            "this kernel is Linux 5.10.0: flowmon needs 5.12 or later (its flow table's locks use BPF compare-and-exchange); run it on a newer kernel"
        );
    }

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
