//! The metrics endpoint: a minimal HTTP/1.1 server that answers `GET
//! /metrics` with the latest page, in OpenMetrics when the scraper asks for
//! it and in Prometheus' text format otherwise. One request per connection;
//! nothing else is served.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use crate::{metrics, sinks::Page};

/// Where `--metrics` listens when given no address, or only a port.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9475";

/// Parses `--metrics`: `HOST:PORT`, or a bare port on loopback.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().map_err(|_| {
        format!("{s:?} is not an address to listen on: write PORT or IP:PORT, e.g. 127.0.0.1:9475")
    })
}

/// Serves `page` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, page: Arc<Mutex<Page>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let page = page.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, &page)).await;
        });
    }
}

async fn answer(mut stream: TcpStream, page: &Mutex<Page>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // Headers only: a scrape has no body. 16 KiB is far more than any sends.
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let request = String::from_utf8_lossy(&buf);
    let (status, ctype, body) = respond(&request, page);
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !request.starts_with("HEAD ") {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

/// Status line, content type and body for a request's head.
fn respond(request: &str, page: &Mutex<Page>) -> (&'static str, &'static str, String) {
    let mut lines = request.lines();
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" && method != "HEAD" {
        return (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".into(),
        );
    }
    match path.split('?').next().unwrap_or("") {
        "/metrics" => {
            let openmetrics = lines.any(|l| {
                l.to_ascii_lowercase().starts_with("accept:")
                    && l.contains("application/openmetrics-text")
            });
            let p = page.lock().expect("the page lock is never poisoned");
            if openmetrics {
                ("200 OK", metrics::OPENMETRICS, p.openmetrics.clone())
            } else {
                ("200 OK", metrics::TEXT, p.text.clone())
            }
        }
        "/" => (
            "200 OK",
            "text/plain",
            "flowmon: metrics are at /metrics\n".into(),
        ),
        _ => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_and_paths() {
        let page = Mutex::new(Page {
            text: "t\n".into(),
            openmetrics: "om\n# EOF\n".into(),
        });
        let r = respond("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", &page);
        assert_eq!(r, ("200 OK", metrics::TEXT, "t\n".into()));
        let r = respond(
            "GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n",
            &page,
        );
        assert_eq!(r.1, metrics::OPENMETRICS);
        assert_eq!(respond("GET /x HTTP/1.1\r\n\r\n", &page).0, "404 Not Found");
        assert_eq!(
            respond("POST /metrics HTTP/1.1\r\n\r\n", &page).0,
            "405 Method Not Allowed"
        );
    }

    #[test]
    fn addresses_default_to_loopback() {
        assert_eq!(parse_addr("9100").unwrap().to_string(), "127.0.0.1:9100");
        assert_eq!(
            parse_addr("0.0.0.0:9100").unwrap().to_string(),
            "0.0.0.0:9100"
        );
        assert_eq!(parse_addr("[::1]:9100").unwrap().to_string(), "[::1]:9100");
        assert!(parse_addr("localhost").unwrap_err().contains("IP:PORT"));
    }
}
