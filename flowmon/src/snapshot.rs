//! Snapshot files: JSON lines, one object per closed connection and one per
//! interval aggregate, each with `schema` and `type`; rotated by time and
//! size, and the oldest deleted to keep the directory within a byte budget.
//!
//! Files are named `flowmon-YYYYMMDDTHHMMSSZ.jsonl` after the time they were
//! started (UTC), so names sort in time order. The newest file is the one
//! being appended to; every other file is complete.

use std::{
    fs::{self, File},
    io::{self, BufWriter, Write as _},
    path::{Path, PathBuf},
};

use serde_json::{Value, json};

use crate::{interval::Aggregate, record::ConnRecord};

/// Schema version of connection lines (interval lines carry their own).
pub const SCHEMA_VERSION: u32 = 1;

/// A connection as a snapshot line.
pub fn conn_line(r: &ConnRecord) -> Value {
    let mut v = json!({ "schema": SCHEMA_VERSION, "type": "conn" });
    if let (Value::Object(dst), Value::Object(src)) = (&mut v, r.to_json()) {
        dst.extend(src);
    }
    v
}

/// Rotation and retention of snapshot files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A file is closed and a new one started after this long.
    pub period_ms: u64,
    /// ... or once it holds this many bytes.
    pub file_bytes: u64,
    /// The oldest files are deleted to keep all of them within this.
    pub total_bytes: u64,
}

impl Limits {
    /// Files of at most an eighth of the budget, so deleting the oldest
    /// keeps most of the history.
    pub fn new(period_ms: u64, total_bytes: u64) -> Self {
        Self {
            period_ms: period_ms.max(1),
            file_bytes: (total_bytes / 8).max(64 * 1024),
            total_bytes,
        }
    }
}

struct Current {
    out: BufWriter<File>,
    started_ms: u64,
    bytes: u64,
}

pub struct Snapshots {
    dir: PathBuf,
    limits: Limits,
    current: Option<Current>,
}

impl Snapshots {
    pub fn new(dir: &Path, limits: Limits) -> io::Result<Self> {
        fs::create_dir_all(dir).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot create snapshot directory {}: {e}", dir.display()),
            )
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            limits,
            current: None,
        })
    }

    /// Appends one poll's closed connections and finished intervals at Unix
    /// time `now_ms`, rotating first if the current file is due, and flushes.
    pub fn write(
        &mut self,
        now_ms: u64,
        closed: &[ConnRecord],
        rows: &[Aggregate],
    ) -> io::Result<()> {
        if self.current.as_ref().is_some_and(|c| {
            now_ms.saturating_sub(c.started_ms) >= self.limits.period_ms
                || c.bytes >= self.limits.file_bytes
        }) {
            self.rotate()?;
        }
        if closed.is_empty() && rows.is_empty() {
            return Ok(());
        }
        if self.current.is_none() {
            self.start(now_ms)?;
        }
        let cur = self.current.as_mut().expect("started above");
        let lines = closed
            .iter()
            .map(conn_line)
            .chain(rows.iter().map(Aggregate::to_json));
        for v in lines {
            let mut line = v.to_string();
            line.push('\n');
            cur.out.write_all(line.as_bytes())?;
            cur.bytes += line.len() as u64;
        }
        cur.out.flush()
    }

    /// Closes the current file (when the agent stops).
    pub fn close(&mut self) -> io::Result<()> {
        self.rotate()
    }

    fn start(&mut self, now_ms: u64) -> io::Result<()> {
        let mut path = self
            .dir
            .join(format!("flowmon-{}.jsonl", file_time(now_ms)));
        // Two files started within one second (a small size budget).
        let mut n = 1;
        while path.exists() {
            path = self
                .dir
                .join(format!("flowmon-{}-{n}.jsonl", file_time(now_ms)));
            n += 1;
        }
        let file = File::options().create_new(true).append(true).open(&path)?;
        self.current = Some(Current {
            out: BufWriter::new(file),
            started_ms: now_ms,
            bytes: 0,
        });
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        if let Some(mut c) = self.current.take() {
            c.out.flush()?;
        }
        self.enforce_budget()
    }

    /// Deletes the oldest files until the rest fit the budget.
    fn enforce_budget(&self) -> io::Result<()> {
        let mut files = self.files()?;
        let mut total: u64 = files.iter().map(|(_, len)| len).sum();
        files.reverse();
        while total > self.limits.total_bytes {
            let Some((oldest, len)) = files.pop() else {
                break;
            };
            fs::remove_file(&oldest)?;
            total -= len;
        }
        Ok(())
    }

    /// Snapshot files in the directory, oldest first, with their sizes.
    pub fn files(&self) -> io::Result<Vec<(PathBuf, u64)>> {
        let mut files = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let e = e?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("flowmon-") && name.ends_with(".jsonl") {
                files.push((e.path(), e.metadata()?.len()));
            }
        }
        files.sort();
        Ok(files)
    }
}

/// `YYYYMMDDTHHMMSSZ` for Unix milliseconds.
fn file_time(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        s / 3600,
        (s / 60) % 60,
        s % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interval::{Intervals, tests::conn};

    #[test]
    fn file_names_are_utc_times() {
        assert_eq!(file_time(0), "19700101T000000Z");
        assert_eq!(file_time(1_795_000_000_000), "20261118T110640Z");
        assert_eq!(file_time(951_782_400_000), "20000229T000000Z");
    }

    fn lines(path: &Path) -> Vec<Value> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn lines_rotation_and_budget() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Snapshots::new(dir.path(), Limits::new(60_000, 1 << 20)).unwrap();
        let mut iv = Intervals::new(10_000);
        iv.add(1_795_000_000_000, &[], &[]);
        let rows = iv.add(1_795_000_010_000, &[], &[conn(1, 80, 1)]);
        s.write(1_795_000_010_000, &[conn(1, 80, 1)], &rows)
            .unwrap();
        s.write(1_795_000_020_000, &[conn(2, 80, 0)], &[]).unwrap();
        // A minute after the first line: a new file.
        s.write(1_795_000_070_000, &[conn(3, 80, 0)], &[]).unwrap();
        s.close().unwrap();
        let files = s.files().unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "flowmon-20261118T110650Z.jsonl",
                "flowmon-20261118T110750Z.jsonl"
            ]
        );
        let first = lines(&files[0].0);
        let types: Vec<_> = first.iter().map(|v| v["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["conn", "interval", "conn"]);
        assert_eq!(
            (
                first[0]["schema"].as_u64(),
                first[0]["rst.count.srv"].as_u64()
            ),
            (Some(1), Some(1))
        );
        assert_eq!(
            (first[1]["scope"].as_str(), first[1]["start"].as_f64()),
            (Some("global"), Some(1_795_000_000.0))
        );
        assert_eq!(lines(&files[1].0)[0]["server.ip"], "10.0.0.3");

        // A budget of two small files: the oldest go.
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            period_ms: 1_000,
            file_bytes: 1 << 20,
            total_bytes: 2_000,
        };
        let mut s = Snapshots::new(dir.path(), limits).unwrap();
        for i in 0..5 {
            s.write(1_795_000_000_000 + i * 1_000, &[conn(1, 80, 1)], &[])
                .unwrap();
        }
        s.close().unwrap();
        let files = s.files().unwrap();
        let total: u64 = files.iter().map(|f| f.1).sum();
        assert!(total <= 2_000 && files.len() >= 2, "{files:?}");
        assert!(
            files
                .last()
                .unwrap()
                .0
                .to_string_lossy()
                .ends_with("110644Z.jsonl"),
            "the newest stays"
        );
    }
}
