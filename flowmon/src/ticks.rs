//! Calibrates the programs' coarse clock: how jiffies map to CLOCK_MONOTONIC.
//!
//! Reading jiffies costs the programs one load where any clock helper costs a
//! call (15–25 ns a packet here), so routine packets time themselves from it.
//! The kernel advances jiffies by one every tick (`TICK_NSEC`, set by the
//! kernel's HZ) in step with CLOCK_MONOTONIC, so a tick length and one tick's
//! start time convert any later jiffies value. Both are measured by running a
//! tiny program that reads jiffies and the clock together until jiffies has
//! changed a few times.

use std::time::{Duration, Instant};

use aya::programs::{TestRun as _, TestRunOptions, Xdp};

/// `TICK_NSEC` for the HZ values Linux is built with: 100, 250, 300, 1000.
pub const TICKS_NS: [u64; 4] = [10_000_000, 4_000_000, 3_333_333, 1_000_000];

/// Jiffies changes to observe, at least ...
const BOUNDARIES: usize = 4;
/// ... spanning at least this many ticks, so that a tick interrupt delayed
/// by up to a third of a tick moves the estimate by less than 5 %.
const SPAN: u64 = 8;

/// Readings further apart than this around a change are not used: the
/// reader was preempted, and the change could be anywhere in between.
const MAX_GAP_NS: u64 = 200_000;

/// How jiffies convert to CLOCK_MONOTONIC nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticks {
    pub tick_ns: u64,
    /// A jiffies value ...
    pub jiffies_at: u64,
    /// ... and when it began (the last reading before it).
    pub jiffies_ns: u64,
}

/// From `(jiffies, ns)` readings in time order, the tick length and one
/// tick's start (the least delayed of the steps seen): each step of exactly one jiffy between readings at most
/// [`MAX_GAP_NS`] apart marks a tick start (the earlier reading is taken).
/// `None` unless at least [`BOUNDARIES`] such steps, [`SPAN`] jiffies
/// apart first to last, were seen, and their spacing is within 5 % of a
/// known tick length (the closest two, 250 and 300 Hz, are 17 % apart).
pub fn calibrate(readings: &[(u64, u64)]) -> Option<Ticks> {
    let starts: Vec<(u64, u64)> = readings
        .windows(2)
        .filter(|w| w[1].0 == w[0].0 + 1 && w[1].1.saturating_sub(w[0].1) <= MAX_GAP_NS)
        .map(|w| (w[1].0, w[0].1))
        .collect();
    if starts.len() < BOUNDARIES {
        return None;
    }
    let (first, last) = (starts[0], starts[starts.len() - 1]);
    if last.0 - first.0 < SPAN {
        return None;
    }
    let spacing = (last.1 - first.1) / (last.0 - first.0);
    let tick_ns = TICKS_NS.into_iter().min_by_key(|t| t.abs_diff(spacing))?;
    if tick_ns.abs_diff(spacing) * 20 > tick_ns {
        return None;
    }
    // A tick interrupt can run late, never early: each step, carried forward
    // to the last one's jiffies, bounds its start from above, and the
    // least delayed step is the closest.
    let jiffies_ns = starts
        .iter()
        .map(|&(j, t)| t + (last.0 - j) * tick_ns)
        .min()?;
    Some(Ticks {
        tick_ns,
        jiffies_at: last.0,
        jiffies_ns,
    })
}

/// Runs the calibration program `prog` (loaded) until [`calibrate`]
/// succeeds, at most half a second (a busy machine preempts the reader and
/// delays ticks; an idle one is done in five ticks). Only readings next to a
/// change are kept. When the ticks stayed too irregular for that, the
/// conversion is [`estimate`]d from the last reading. `None` only when the
/// program cannot run at all.
pub fn measure(prog: &Xdp) -> Option<Ticks> {
    let deadline = Instant::now() + Duration::from_millis(500);
    let input = [0u8; 64];
    let mut output = [0u8; 64];
    let mut readings = Vec::new();
    let mut prev: Option<(u64, u64)> = None;
    while Instant::now() < deadline {
        prog.test_run(TestRunOptions {
            data_in: Some(&input),
            data_out: Some(&mut output),
            ..Default::default()
        })
        .ok()?;
        let word = |i: usize| u64::from_ne_bytes(output[i..i + 8].try_into().unwrap());
        let now = (word(0), word(8));
        if let Some(p) = prev
            && p.0 != now.0
        {
            readings.extend([p, now]);
            if let Some(t) = calibrate(&readings) {
                return Some(t);
            }
        }
        prev = Some(now);
    }
    prev.map(|last| estimate(last, coarse_resolution()))
}

/// The conversion from one `(jiffies, ns)` reading and the tick length
/// `tick_ns` (the coarse clock's resolution, which is the kernel's tick):
/// the reading fell somewhere within its tick, so the tick is taken to have
/// begun half a tick before it, and times are within half a tick either way.
pub fn estimate(reading: (u64, u64), tick_ns: u64) -> Ticks {
    let tick_ns = if tick_ns == 0 { TICKS_NS[1] } else { tick_ns };
    Ticks {
        tick_ns,
        jiffies_at: reading.0,
        jiffies_ns: reading.1.saturating_sub(tick_ns / 2),
    }
}

/// `clock_getres(CLOCK_MONOTONIC_COARSE)`: the kernel's tick, or 0.
fn coarse_resolution() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // Safety: a plain query into a timespec we own.
    if unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_length_and_start_from_readings() {
        // HZ=250: jiffies 1000 begins at 4.98 ms; readings every 0.1 ms
        // from 4.99 ms to 44.89 ms.
        let readings: Vec<(u64, u64)> = (0..400u64)
            .map(|i| {
                let t = 4_990_000 + i * 100_000;
                (1000 + (t - 4_990_000 + 10_000) / 4_000_000, t)
            })
            .collect();
        let t = calibrate(&readings).unwrap();
        assert_eq!(t.tick_ns, 4_000_000);
        // The last step: 1009 begins at 40.98 ms, between the readings at
        // 40.89 ms and 40.99 ms; the earlier one is taken.
        assert_eq!((t.jiffies_at, t.jiffies_ns), (1009, 40_890_000));
    }

    #[test]
    fn a_late_tick_does_not_move_the_start() {
        // HZ=1000, jiffies 0 at 0; readings every 0.05 ms for 12 ms, but the
        // last step (to 11) is seen 0.3 ms late, as a late tick interrupt
        // would make it.
        let readings: Vec<(u64, u64)> = (0..240u64)
            .map(|i| {
                let t = i * 50_000;
                let j = t / 1_000_000;
                (if j == 11 && t < 11_300_000 { 10 } else { j }, t)
            })
            .collect();
        let t = calibrate(&readings).unwrap();
        assert_eq!(t.tick_ns, 1_000_000);
        // Read 0.05 ms before each on-time step: 10.95 ms for jiffies 11.
        assert_eq!((t.jiffies_at, t.jiffies_ns), (11, 10_950_000));
    }

    #[test]
    fn too_few_or_irregular_steps_give_nothing() {
        assert_eq!(calibrate(&[(1, 10), (2, 20)]), None);
        // Steps of 2.2 ms, read every 0.1 ms: no Linux tick is within 5 %.
        let odd: Vec<(u64, u64)> = (0..400u64).map(|i| (i / 22, i * 100_000)).collect();
        assert_eq!(calibrate(&odd), None);
        // 3.6 ms: between 250 and 300 Hz, too far from either.
        let between: Vec<(u64, u64)> = (0..600u64).map(|i| (i / 36, i * 100_000)).collect();
        assert_eq!(calibrate(&between), None);
        // Four steps over fewer than eight ticks are not enough.
        let short: Vec<(u64, u64)> = (0..250u64).map(|i| (i / 40, i * 100_000)).collect();
        assert_eq!(calibrate(&short), None);
        // Jumps of two jiffies (the reader was preempted) are not steps.
        let jumps: Vec<(u64, u64)> = (0..10u64).map(|i| (2 * i, i * 8_000_000)).collect();
        assert_eq!(calibrate(&jumps), None);
        // Nor are single steps between readings a tick apart.
        let slow: Vec<(u64, u64)> = (0..10u64).map(|i| (i, i * 4_000_000)).collect();
        assert_eq!(calibrate(&slow), None);
    }

    #[test]
    fn an_estimate_centres_the_reading_in_its_tick() {
        let t = estimate((1000, 50_000_000), 4_000_000);
        assert_eq!(
            (t.tick_ns, t.jiffies_at, t.jiffies_ns),
            (4_000_000, 1000, 48_000_000)
        );
        // No resolution to go on: HZ=250, the most common.
        assert_eq!(estimate((7, 9_000_000), 0).tick_ns, 4_000_000);
        // This machine's coarse clock ticks at one of Linux's tick lengths.
        assert!(
            TICKS_NS.contains(&coarse_resolution()),
            "{}",
            coarse_resolution()
        );
    }
}
