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

/// Jiffies changes to observe: three tick lengths averaged.
const BOUNDARIES: usize = 4;

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
/// tick's start: each step of exactly one jiffy marks a tick start between
/// the two readings (the earlier one is taken). `None` unless at least
/// [`BOUNDARIES`] such steps were seen and their spacing is within 10 % of
/// a known tick length.
pub fn calibrate(readings: &[(u64, u64)]) -> Option<Ticks> {
    let starts: Vec<(u64, u64)> = readings
        .windows(2)
        .filter(|w| w[1].0 == w[0].0 + 1)
        .map(|w| (w[1].0, w[0].1))
        .collect();
    if starts.len() < BOUNDARIES {
        return None;
    }
    let (first, last) = (starts[0], starts[starts.len() - 1]);
    let spacing = (last.1 - first.1) / (last.0 - first.0);
    let tick_ns = TICKS_NS.into_iter().min_by_key(|t| t.abs_diff(spacing))?;
    (tick_ns.abs_diff(spacing) * 10 <= tick_ns).then_some(Ticks {
        tick_ns,
        jiffies_at: last.0,
        jiffies_ns: last.1,
    })
}

/// Runs the calibration program `prog` (loaded) until jiffies changed
/// [`BOUNDARIES`] times, at most 200 ms (HZ=100 needs 40 ms). Only readings
/// next to a change are kept.
pub fn measure(prog: &Xdp) -> Option<Ticks> {
    let deadline = Instant::now() + Duration::from_millis(200);
    let input = [0u8; 64];
    let mut output = [0u8; 64];
    let mut readings = Vec::new();
    let mut prev: Option<(u64, u64)> = None;
    let mut changes = 0;
    while changes < BOUNDARIES && Instant::now() < deadline {
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
            changes += 1;
        }
        prev = Some(now);
    }
    calibrate(&readings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_length_and_start_from_readings() {
        // HZ=250: jiffies 1000 begins at 4.98 ms; readings every 0.7 ms
        // from 4.99 ms to 32.29 ms.
        let readings: Vec<(u64, u64)> = (0..40u64)
            .map(|i| {
                let t = 4_990_000 + i * 700_000;
                (1000 + (t - 4_990_000 + 10_000) / 4_000_000, t)
            })
            .collect();
        let t = calibrate(&readings).unwrap();
        assert_eq!(t.tick_ns, 4_000_000);
        // The last step: 1006 begins at 28.98 ms, between the readings at
        // 28.79 ms and 29.49 ms; the earlier one is taken.
        assert_eq!((t.jiffies_at, t.jiffies_ns), (1006, 28_790_000));
    }

    #[test]
    fn too_few_or_irregular_steps_give_nothing() {
        assert_eq!(calibrate(&[(1, 10), (2, 20)]), None);
        // Steps of 2.2 ms: no Linux tick is within 10 %.
        let odd: Vec<(u64, u64)> = (0..10u64).map(|i| (i, i * 2_200_000)).collect();
        assert_eq!(calibrate(&odd), None);
        // Jumps of two jiffies (the reader was preempted) are not steps.
        let jumps: Vec<(u64, u64)> = (0..10u64).map(|i| (2 * i, i * 8_000_000)).collect();
        assert_eq!(calibrate(&jumps), None);
    }
}
