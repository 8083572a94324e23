//! `flowmon replay`: every packet of a capture through the loaded XDP
//! program with `BPF_PROG_TEST_RUN`, at the capture's own timestamps, then
//! the same model as `analyze`. Where the two disagree, one of them is wrong.

use std::path::Path;

use aya::programs::{TestRun as _, TestRunOptions};
use flowmon_common::stats::{STAT_COUNT, STAT_MALFORMED, STAT_PACKETS};

use crate::{
    capture::{Capture, CaptureError},
    close::Timeouts,
    kernel::{Kernel, KernelError},
    offline::{Analysis, capture_names},
};

/// The kernel refuses test frames larger than a page less its head- and
/// tailroom; headers are all the programs read, and lengths come from the
/// headers, so a longer frame is cut without changing any count.
pub const MAX_TEST_FRAME: usize = 3000;
const ETH_HLEN: usize = 14;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("running packet {packet} through the XDP program failed")]
    TestRun {
        packet: u64,
        #[source]
        source: aya::programs::ProgramError,
    },
}

/// Replays `path` through `kernel`, which must be freshly loaded and not
/// attached anywhere.
pub fn replay(kernel: &mut Kernel, path: &Path, t: &Timeouts) -> Result<Analysis, ReplayError> {
    let mut cap = Capture::open(path)?;
    let mut extra = [0u64; STAT_COUNT as usize];
    let mut end_ns = 0;
    let mut ifaces = 0;
    let mut retired = Vec::new();
    let mut out = vec![0u8; MAX_TEST_FRAME + 256];
    let mut damaged = None;
    let mut n = 0;
    while let Some(p) = crate::offline::next_packet(&mut cap, &mut damaged) {
        n += 1;
        end_ns = end_ns.max(p.ts_ns);
        ifaces = ifaces.max(p.iface + 1);
        if p.frame.len() < ETH_HLEN {
            // Too short for the kernel to accept as a test frame: what the
            // program would have done is count it as malformed.
            extra[STAT_PACKETS as usize] += 1;
            extra[STAT_MALFORMED as usize] += 1;
            continue;
        }
        kernel.set_clock_override(p.ts_ns)?;
        let frame = &p.frame[..p.frame.len().min(MAX_TEST_FRAME)];
        kernel
            .xdp()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .map_err(|source| ReplayError::TestRun { packet: n, source })?;
        // Drain as we go: the ring buffer holds a few thousand retired connections.
        retired.extend(kernel.drain_retired()?);
    }
    kernel.set_clock_override(0)?;
    retired.extend(kernel.drain_retired()?);
    let mut totals = kernel.stats()?;
    for (t, e) in totals.iter_mut().zip(extra) {
        *t += e;
    }
    retired.extend(kernel.flows()?);
    // Every test run receives on the loopback device: interface 0 of the capture.
    let names = capture_names(&cap, 1);
    let records = crate::record::build(retired, &names, end_ns, t, 0);
    Ok(Analysis {
        records,
        totals,
        end_ns,
        damaged,
    })
}
