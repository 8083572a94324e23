//! The agent's local API: JSON lines over a Unix socket.
//!
//! # Protocol
//! A client connects to the socket (default `/run/flowmon/flowmon.sock`,
//! owner root, mode 0600), writes one request line and reads one reply line.
//! The request is a [`Request`] object, for example
//! `{"view":"top-servers","filter":"rst.count > 0","limit":10}` (views:
//! `flows`, `top-clients`, `top-servers`, `conversations`, `diagnose`; optional
//! `filter`, `sort`, `limit`, `client`, `server`). The reply is
//! `{"ok":true,"columns":[{"key":..,"title":..,"kind":..}],"rows":[{..}]}`,
//! rows being flat objects keyed by field names, or
//! `{"ok":false,"error":"...","usage":true|false}` where `usage` says the
//! request itself was wrong (a bad filter, an unknown sort field).

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::{
        fs::PermissionsExt as _,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::views::{Request, Response, ViewError};

pub const DEFAULT_SOCKET: &str = "/run/flowmon/flowmon.sock";

/// One reply line.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub response: Option<Response>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub usage: bool,
}

impl Reply {
    pub fn answer(result: Result<Response, ViewError>) -> Self {
        match result {
            Ok(r) => Self {
                ok: true,
                response: Some(r),
                error: None,
                usage: false,
            },
            Err(e) => Self::error(e.to_string(), true),
        }
    }

    pub fn error(message: String, usage: bool) -> Self {
        Self {
            ok: false,
            response: None,
            error: Some(message),
            usage,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no flowmon agent is listening on {}: start one with `flowmon run` (as root), or query a capture with --pcap FILE", .path.display())]
    NoAgent { path: PathBuf },
    #[error("permission denied on {}: the API socket is root-only; run as root", .path.display())]
    Permission { path: PathBuf },
    #[error("{message}")]
    Rejected { message: String, usage: bool },
    #[error("talking to the agent on {} failed", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the agent on {} answered something that is not a flowmon reply", .path.display())]
    Garbled { path: PathBuf },
}

/// Binds the API socket: creates its folder, replaces a stale socket that
/// nobody answers on, refuses to replace a live agent's, and makes the socket
/// root-only.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "another flowmon agent is listening on {}: stop it, or give this one another --socket",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Sends `req` to the agent on `path` and returns its answer.
pub fn query(path: &Path, req: &Request) -> Result<Response, ApiError> {
    let io_err = |source: io::Error| match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            ApiError::NoAgent { path: path.into() }
        }
        io::ErrorKind::PermissionDenied => ApiError::Permission { path: path.into() },
        _ => ApiError::Io {
            path: path.into(),
            source,
        },
    };
    let mut stream = UnixStream::connect(path).map_err(io_err)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io_err)?;
    let mut line = serde_json::to_string(req).expect("a request serializes");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io_err)?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(io_err)?;
    let reply: Reply =
        serde_json::from_str(&reply).map_err(|_| ApiError::Garbled { path: path.into() })?;
    match (reply.ok, reply.response) {
        (true, Some(r)) => Ok(r),
        _ => Err(ApiError::Rejected {
            message: reply
                .error
                .unwrap_or_else(|| "the agent refused the request".into()),
            usage: reply.usage,
        }),
    }
}

/// Parses one request line; a malformed one gets an error reply.
pub fn parse_request(line: &str) -> Result<Request, Reply> {
    serde_json::from_str(line).map_err(|e| Reply::error(format!("bad request: {e}"), true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::View;

    #[test]
    fn requests_round_trip_and_bad_ones_are_usage_errors() {
        let mut r = Request::new(View::TopServers);
        r.filter = Some("rst.count > 0".into());
        r.limit = Some(5);
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(
            line,
            r#"{"view":"top-servers","filter":"rst.count > 0","limit":5}"#
        );
        assert_eq!(parse_request(&line).unwrap(), r);
        let bad = parse_request(r#"{"view":"nope"}"#).unwrap_err();
        assert!(
            bad.usage
                && bad
                    .error
                    .unwrap()
                    .starts_with("bad request: unknown variant `nope`")
        );
    }

    #[test]
    fn replies_are_flat() {
        let ok = Reply::answer(Ok(Response {
            columns: vec![],
            rows: vec![serde_json::json!({"conns": 1})],
        }));
        assert_eq!(
            serde_json::to_string(&ok).unwrap(),
            r#"{"ok":true,"columns":[],"rows":[{"conns":1}],"usage":false}"#
        );
    }
}
