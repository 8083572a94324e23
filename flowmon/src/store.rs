//! History on disk: closed connections and interval aggregates in SQLite,
//! so they survive an agent restart and `--since` queries and `graph` can
//! read them, with or without a running agent.
//!
//! Connections are stored as the kernel's own key and value bytes plus what
//! was decided when they were reported (class, side, times): reading one back
//! gives the very record that was reported, and every field the filters know
//! derives from it. WAL mode lets readers run while the agent writes.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use flowmon_common::flow::{FlowKey, FlowValue};
use rusqlite::{Connection, OpenFlags, params};
use serde_json::Value;

use crate::{
    close::{Close, ClosedBy},
    interval::Aggregate,
    model::Conn,
    record::ConnRecord,
};

/// Where the agent keeps its history unless told otherwise.
pub const DEFAULT_PATH: &str = "/var/lib/flowmon/history.db";

/// Layout version of the database (bumped on incompatible changes).
const SCHEMA_VERSION: i64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "no history at {}: `flowmon run` writes it there (or point to another file with --db)",
        .0.display()
    )]
    Missing(PathBuf),
    #[error("cannot create {}: {source}", .path.display())]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} was written by another version of flowmon (layout {found}, this one reads {SCHEMA_VERSION}): move it away or use --db",
        .path.display()
    )]
    Version { path: PathBuf, found: i64 },
    #[error("history database {}: {source}", .path.display())]
    Sql {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("history database {}: a stored connection is damaged (row {row})", .path.display())]
    Damaged { path: PathBuf, row: i64 },
}

pub struct Store {
    db: Connection,
    path: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the database the agent writes.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Create {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let db = Connection::open(path).map_err(|e| sql(path, e))?;
        let store = Self {
            db,
            path: path.to_path_buf(),
        };
        store
            .db
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = NORMAL;
                 CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
                 CREATE TABLE IF NOT EXISTS conns (
                     id INTEGER PRIMARY KEY,
                     first_seen REAL NOT NULL,
                     last_seen REAL NOT NULL,
                     iface TEXT NOT NULL,
                     close TEXT NOT NULL,
                     closed_by TEXT NOT NULL,
                     key BLOB NOT NULL,
                     value BLOB NOT NULL);
                 CREATE INDEX IF NOT EXISTS conns_last_seen ON conns (last_seen);
                 CREATE TABLE IF NOT EXISTS intervals (
                     start REAL NOT NULL,
                     end REAL NOT NULL,
                     scope TEXT NOT NULL,
                     key TEXT NOT NULL,
                     row TEXT NOT NULL,
                     PRIMARY KEY (scope, key, start, end));
                 CREATE INDEX IF NOT EXISTS intervals_end ON intervals (end);
                 INSERT OR IGNORE INTO meta VALUES ('schema', 1);",
            )
            .map_err(|e| sql(path, e))?;
        store.check_version()?;
        // Readers (the CLI) and the agent may touch the file at once.
        store
            .db
            .busy_timeout(Duration::from_secs(5))
            .map_err(|e| sql(path, e))?;
        Ok(store)
    }

    /// Opens an existing database read-only (the query commands).
    pub fn open_read(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing(path.to_path_buf()));
        }
        let db = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| sql(path, e))?;
        db.busy_timeout(Duration::from_secs(5))
            .map_err(|e| sql(path, e))?;
        let store = Self {
            db,
            path: path.to_path_buf(),
        };
        store.check_version()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_version(&self) -> Result<(), StoreError> {
        let found: i64 = self
            .db
            .query_row("SELECT value FROM meta WHERE name = 'schema'", [], |r| {
                r.get(0)
            })
            .map_err(|e| self.err(e))?;
        if found != SCHEMA_VERSION {
            return Err(StoreError::Version {
                path: self.path.clone(),
                found,
            });
        }
        Ok(())
    }

    fn err(&self, e: rusqlite::Error) -> StoreError {
        sql(&self.path, e)
    }

    /// Appends one poll's closed connections and finished intervals, in one
    /// transaction.
    pub fn add(&mut self, closed: &[ConnRecord], rows: &[Aggregate]) -> Result<(), StoreError> {
        if closed.is_empty() && rows.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        let e = |e| sql(&path, e);
        let tx = self.db.transaction().map_err(e)?;
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT INTO conns (first_seen, last_seen, iface, close, closed_by, key, value)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(e)?;
            for r in closed {
                ins.execute(params![
                    r.first_seen,
                    r.last_seen,
                    r.iface,
                    r.close.as_str(),
                    r.closed_by.as_str(),
                    bytes_of(&r.conn.key),
                    bytes_of(&r.conn.value),
                ])
                .map_err(e)?;
            }
            let mut ins = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO intervals (start, end, scope, key, row)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(e)?;
            for a in rows {
                ins.execute(params![
                    a.start_ms as f64 / 1e3,
                    a.end_ms as f64 / 1e3,
                    a.scope.kind(),
                    a.scope.key(),
                    a.to_json().to_string(),
                ])
                .map_err(e)?;
            }
        }
        tx.commit().map_err(e)
    }

    /// Deletes connections last seen, and intervals ended, before `unix`
    /// seconds. Returns how many of each went.
    pub fn prune(&mut self, unix: f64) -> Result<(usize, usize), StoreError> {
        let conns = self
            .db
            .execute("DELETE FROM conns WHERE last_seen < ?1", [unix])
            .map_err(|e| self.err(e))?;
        let intervals = self
            .db
            .execute("DELETE FROM intervals WHERE end < ?1", [unix])
            .map_err(|e| self.err(e))?;
        Ok((conns, intervals))
    }

    /// Connections seen at or after `unix` seconds, oldest first.
    pub fn conns_since(&self, unix: f64) -> Result<Vec<ConnRecord>, StoreError> {
        let mut q = self
            .db
            .prepare_cached(
                "SELECT id, first_seen, last_seen, iface, close, closed_by, key, value
                 FROM conns WHERE last_seen >= ?1 ORDER BY first_seen, id",
            )
            .map_err(|e| self.err(e))?;
        let rows = q
            .query_map([unix], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, f64>(1)?,
                    r.get::<_, f64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, Vec<u8>>(6)?,
                    r.get::<_, Vec<u8>>(7)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, first, last, iface, close, by, key, value) = row.map_err(|e| self.err(e))?;
            let damaged = || StoreError::Damaged {
                path: self.path.clone(),
                row: id,
            };
            let key: FlowKey = from_bytes(&key).ok_or_else(damaged)?;
            let value: FlowValue = from_bytes(&value).ok_or_else(damaged)?;
            let close = Close::parse(&close).ok_or_else(damaged)?;
            let by = ClosedBy::parse(&by).ok_or_else(damaged)?;
            out.push(ConnRecord::from_parts(
                Conn::new(key, value),
                iface,
                close,
                by,
                first,
                last,
            ));
        }
        Ok(out)
    }

    /// Interval rows of scope `kind` (and `key`, if given) that ended after
    /// `unix` seconds, oldest first. An interval an agent restart cut in two
    /// has two rows with the same start (see `graph::merge_rows`).
    pub fn intervals_since(
        &self,
        unix: f64,
        kind: &str,
        key: Option<&str>,
    ) -> Result<Vec<Value>, StoreError> {
        let mut q = self
            .db
            .prepare_cached(
                "SELECT row FROM intervals WHERE end > ?1 AND scope = ?2 AND (?3 IS NULL OR key = ?3)
                 ORDER BY start, key",
            )
            .map_err(|e| self.err(e))?;
        let rows = q
            .query_map(params![unix, kind, key], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let text = row.map_err(|e| self.err(e))?;
            out.push(
                serde_json::from_str(&text).map_err(|_| StoreError::Damaged {
                    path: self.path.clone(),
                    row: -1,
                })?,
            );
        }
        Ok(out)
    }
}

fn sql(path: &Path, source: rusqlite::Error) -> StoreError {
    StoreError::Sql {
        path: path.to_path_buf(),
        source,
    }
}

/// The bytes of a kernel map type. Sound for `FlowKey` and `FlowValue`:
/// `#[repr(C)]`, every padding byte an explicit field, so no byte is
/// uninitialised.
fn bytes_of<T: aya::Pod>(t: &T) -> &[u8] {
    // SAFETY: `T: Pod` is plain data with no padding holes (see above).
    unsafe { std::slice::from_raw_parts((t as *const T).cast::<u8>(), size_of::<T>()) }
}

fn from_bytes<T: aya::Pod>(b: &[u8]) -> Option<T> {
    // SAFETY: the length is checked; any bit pattern is a valid `T: Pod`.
    (b.len() == size_of::<T>()).then(|| unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interval::{Intervals, tests::conn};

    #[test]
    fn history_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/history.db");
        let mut iv = Intervals::new(10_000);
        let mut a = conn(1, 80, 1);
        a.first_seen = 1000.0;
        a.last_seen = 1001.5;
        let mut b = conn(2, 443, 0);
        b.first_seen = 2000.0;
        b.last_seen = 2005.0;
        iv.add(1_000_000, &[], &[a.clone()]);
        let rows = iv.add(1_010_000, &[], &[b.clone()]);
        {
            let mut s = Store::open(&path).unwrap();
            s.add(&[a.clone()], &[]).unwrap();
            s.add(&[b.clone()], &rows).unwrap();
        }
        let s = Store::open_read(&path).unwrap();
        assert_eq!(s.conns_since(0.0).unwrap(), vec![a.clone(), b.clone()]);
        assert_eq!(s.conns_since(1002.0).unwrap(), vec![b.clone()]);
        let global = s.intervals_since(0.0, "global", None).unwrap();
        assert_eq!(global.len(), 1);
        assert_eq!(
            (
                global[0]["start"].as_f64(),
                global[0]["rst.count.srv"].as_u64()
            ),
            (Some(1000.0), Some(1))
        );
        assert_eq!(
            s.intervals_since(0.0, "server", Some("10.0.0.1"))
                .unwrap()
                .len(),
            1
        );
        assert!(
            s.intervals_since(1010.0, "global", None)
                .unwrap()
                .is_empty()
        );
        drop(s);
        let mut s = Store::open(&path).unwrap();
        assert_eq!(
            s.prune(1500.0).unwrap(),
            (1, 4),
            "a and the four rows (global, iface, server, port)"
        );
        assert_eq!(s.conns_since(0.0).unwrap(), vec![b]);
    }

    #[test]
    fn a_missing_database_says_who_writes_it() {
        let e = Store::open_read(Path::new("/nonexistent/history.db"))
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "no history at /nonexistent/history.db: `flowmon run` writes it there (or point to another file with --db)"
        );
    }
}
