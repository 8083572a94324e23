//! `flowmon graph`'s drawing: series over time from interval rows, drawn in
//! the terminal as text or as an SVG or PNG image (plotters).
//!
//! A ratio (RST or SYN per connection) over an interval that closed no
//! connection is undefined: that point is left out, not drawn as zero.

use std::{fmt::Write as _, path::Path};

use plotters::prelude::*;
use serde_json::Value;

use crate::{close::Close, record::clock_time};

/// What to draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Metric {
    /// RST per closed connection, from the client and from the server.
    RstPerConn,
    /// SYN per closed connection (above 1: retries).
    SynPerConn,
    /// Connections closed, per close class.
    Closes,
}

/// One line of the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    /// (interval start in Unix seconds, value)
    pub points: Vec<(f64, f64)>,
}

/// A graph ready to draw.
#[derive(Clone, Debug, PartialEq)]
pub struct Graph {
    pub title: String,
    pub y_label: &'static str,
    pub series: Vec<Series>,
}

/// Rows with the same start merged into one (an agent restarted within an
/// interval leaves a row for each part): counts summed, ratios computed
/// again from the sums.
pub fn merge_rows(rows: &[Value]) -> Vec<Value> {
    let mut merged: Vec<Value> = Vec::new();
    for r in rows {
        match merged.last_mut() {
            Some(last) if last["start"] == r["start"] => {
                if let (Value::Object(dst), Value::Object(src)) = (last, r) {
                    for (k, v) in src {
                        if let (Some(a), Some(b)) = (dst.get(k).and_then(Value::as_u64), v.as_u64())
                        {
                            dst.insert(k.clone(), (a + b).into());
                        }
                    }
                }
            }
            _ => merged.push(r.clone()),
        }
    }
    for r in &mut merged {
        let n = |k: &str| r[k].as_u64().unwrap_or(0) as f64;
        let conns = n("conns");
        let ratio = |x: f64| if conns > 0.0 { x / conns } else { 0.0 };
        let (syn, clt, srv) = (n("syn.count"), n("rst.count.clt"), n("rst.count.srv"));
        r["syn.per_conn"] = ratio(syn).into();
        r["rst.per_conn.clt"] = ratio(clt).into();
        r["rst.per_conn.srv"] = ratio(srv).into();
        r["rst.per_conn"] = ratio(clt + srv).into();
    }
    merged
}

impl Graph {
    /// Builds the graph of `metric` from interval rows (oldest first).
    pub fn new(metric: Metric, rows: &[Value], scope: &str) -> Self {
        let rows = &merge_rows(rows);
        let at = |r: &Value| r["start"].as_f64().unwrap_or(0.0);
        let num = |r: &Value, k: &str| r[k].as_f64().unwrap_or(0.0);
        let ratio = |key: &'static str| {
            rows.iter()
                .filter(|r| num(r, "conns") > 0.0)
                .map(|r| (at(r), num(r, key)))
                .collect::<Vec<_>>()
        };
        let (title, y_label, series) = match metric {
            Metric::RstPerConn => (
                "RST per connection",
                "RST per closed connection",
                vec![
                    Series {
                        name: "client".into(),
                        points: ratio("rst.per_conn.clt"),
                    },
                    Series {
                        name: "server".into(),
                        points: ratio("rst.per_conn.srv"),
                    },
                ],
            ),
            Metric::SynPerConn => (
                "SYN per connection",
                "SYN per closed connection",
                vec![Series {
                    name: "syn".into(),
                    points: ratio("syn.per_conn"),
                }],
            ),
            Metric::Closes => (
                "Connections closed",
                "connections per interval",
                Close::ALL
                    .iter()
                    .map(|c| format!("close.{}", c.as_str()))
                    .filter(|k| rows.iter().any(|r| num(r, k) > 0.0))
                    .map(|k| Series {
                        points: rows.iter().map(|r| (at(r), num(r, &k))).collect(),
                        name: k.trim_start_matches("close.").to_string(),
                    })
                    .collect(),
            ),
        };
        Self {
            title: format!("{title} ({scope})"),
            y_label,
            series,
        }
    }

    fn x_range(&self) -> Option<(f64, f64)> {
        let xs = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0));
        let (lo, hi) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
        (lo <= hi).then_some((lo, hi))
    }

    fn y_max(&self) -> f64 {
        let m = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(0.0, f64::max);
        if m > 0.0 { m } else { 1.0 }
    }

    /// The graph as text: `height` rows by at most `width` columns, one
    /// symbol per series (shown in the legend; `*` where several meet).
    pub fn text(&self, width: usize, height: usize) -> String {
        let Some((x0, x1)) = self.x_range() else {
            return format!("{}: no data in this period\n", self.title);
        };
        let (width, height) = (width.max(2), height.max(2));
        let ymax = self.y_max();
        let mut grid = vec![vec![' '; width]; height];
        let symbols = symbols(&self.series);
        for (s, sym) in self.series.iter().zip(&symbols) {
            for &(x, y) in &s.points {
                let col = if x1 > x0 {
                    ((x - x0) / (x1 - x0) * (width - 1) as f64).round() as usize
                } else {
                    0
                };
                let row = height - 1 - ((y / ymax) * (height - 1) as f64).round() as usize;
                let cell = &mut grid[row][col];
                *cell = if *cell == ' ' || *cell == *sym {
                    *sym
                } else {
                    '*'
                };
            }
        }
        let label = |v: f64| format!("{v:.2}");
        let lw = label(ymax).len();
        let mut out = format!("{}\n", self.title);
        for (i, row) in grid.iter().enumerate() {
            let y = if i == 0 {
                label(ymax)
            } else if i == height - 1 {
                label(0.0)
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "{y:>lw$} |{}",
                row.iter().collect::<String>().trim_end()
            );
        }
        let _ = writeln!(out, "{:>lw$} +{}", "", "-".repeat(width));
        let (a, b) = (clock_time(x0), clock_time(x1));
        let gap = (width + 1).saturating_sub(a.len() + b.len()).max(1);
        let _ = writeln!(out, "{:>lw$}  {a}{}{b} UTC", "", " ".repeat(gap));
        let legend: Vec<String> = self
            .series
            .iter()
            .zip(&symbols)
            .map(|(s, sym)| format!("{sym} {}", s.name))
            .collect();
        let _ = writeln!(
            out,
            "{:>lw$}  {}  ({})",
            "",
            legend.join("   "),
            self.y_label
        );
        out
    }

    /// Draws the graph as an SVG document.
    pub fn svg(&self) -> Result<String, GraphError> {
        load_font()?;
        let mut s = String::new();
        {
            let root = SVGBackend::with_string(&mut s, SIZE).into_drawing_area();
            self.draw(root)?;
        }
        Ok(s)
    }

    /// Draws the graph into a PNG file.
    pub fn png(&self, path: &Path) -> Result<(), GraphError> {
        load_font()?;
        let root = BitMapBackend::new(path, SIZE).into_drawing_area();
        self.draw(root)
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: DrawingArea<DB, plotters::coord::Shift>,
    ) -> Result<(), GraphError>
    where
        DB::ErrorType: 'static,
    {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| GraphError::Draw(e.to_string());
        root.fill(&WHITE).map_err(e)?;
        let (x0, x1) = self.x_range().unwrap_or((0.0, 1.0));
        let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
        let mut chart = ChartBuilder::on(&root)
            .caption(&self.title, (FONT, 24))
            .margin(16)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, 0.0..self.y_max() * 1.1)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_labels(6)
            .x_desc("time (UTC)")
            .y_desc(self.y_label)
            .x_label_formatter(&|x| clock_time(*x)[..8].to_string())
            .label_style((FONT, 13))
            .draw()
            .map_err(e)?;
        for (i, s) in self.series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(e)?
                .label(s.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
        root.present().map_err(e)
    }
}

/// Interval rows computed from connection records, `len` seconds each (for
/// a server that was never among an interval's busiest, so has no rows of
/// its own). A connection counts in the interval of its last packet.
pub fn rows_from_conns(records: &[crate::record::ConnRecord], len: f64) -> Vec<Value> {
    let len = if len > 0.0 { len } else { 10.0 };
    let mut buckets: std::collections::BTreeMap<i64, crate::aggregate::Metrics> =
        Default::default();
    for r in records {
        buckets
            .entry((r.last_seen / len).floor() as i64)
            .or_default()
            .add(r);
    }
    buckets
        .into_iter()
        .map(|(b, m)| {
            let mut v = m.fields_json();
            v["start"] = (b as f64 * len).into();
            v["end"] = ((b + 1) as f64 * len).into();
            v
        })
        .collect()
}

const SIZE: (u32, u32) = (1000, 500);
const FONT: &str = "sans-serif";
/// Debian's fonts-dejavu-core.
const FONT_FILE: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error(
        "images need the DejaVu Sans font ({FONT_FILE}): install it with `apt-get install fonts-dejavu-core`"
    )]
    NoFont,
    #[error("drawing the graph failed: {0}")]
    Draw(String),
}

/// Registers the font plotters measures and draws text with, once.
fn load_font() -> Result<(), GraphError> {
    static LOADED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *LOADED.get_or_init(|| {
        let Ok(bytes) = std::fs::read(FONT_FILE) else {
            return false;
        };
        // plotters keeps fonts for the process's lifetime.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok()
    });
    if ok { Ok(()) } else { Err(GraphError::NoFont) }
}

/// One symbol per series: its initial when that is unique, else from a list.
fn symbols(series: &[Series]) -> Vec<char> {
    let mut used = Vec::new();
    for s in series {
        let first = s.name.chars().next().unwrap_or('?');
        let sym = std::iter::once(first)
            .chain("#@%&+ox=~".chars())
            .find(|c| !used.contains(c))
            .unwrap_or('?');
        used.push(sym);
    }
    used
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rows() -> Vec<Value> {
        vec![
            json!({"start": 0.0, "conns": 2, "rst.count.clt": 0, "rst.count.srv": 2, "close.fin": 1, "close.rst": 1}),
            json!({"start": 10.0, "conns": 0, "rst.count.clt": 0, "rst.count.srv": 0}),
            // An interval an agent restart cut in two.
            json!({"start": 20.0, "conns": 1, "rst.count.clt": 0, "rst.count.srv": 1, "close.rst": 1}),
            json!({"start": 20.0, "conns": 3, "rst.count.clt": 2, "rst.count.srv": 7, "close.rst": 3}),
        ]
    }

    #[test]
    fn ratios_skip_intervals_without_connections() {
        let g = Graph::new(Metric::RstPerConn, &rows(), "global");
        assert_eq!(g.series[0].points, vec![(0.0, 0.0), (20.0, 0.5)]);
        assert_eq!(g.series[1].points, vec![(0.0, 1.0), (20.0, 2.0)]);
        let closes = Graph::new(Metric::Closes, &rows(), "global");
        let names: Vec<&str> = closes.series.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["fin", "rst"]);
        assert_eq!(
            closes.series[1].points,
            vec![(0.0, 1.0), (10.0, 0.0), (20.0, 4.0)]
        );
    }

    #[test]
    fn rows_from_connections() {
        use crate::interval::tests::conn;
        let mut a = conn(1, 80, 1);
        a.last_seen = 12.0;
        let mut b = conn(1, 80, 3);
        b.last_seen = 19.9;
        let mut c = conn(1, 80, 0);
        c.last_seen = 31.0;
        let rows = rows_from_conns(&[a, b, c], 10.0);
        let g = Graph::new(Metric::RstPerConn, &rows, "10.0.0.1");
        assert_eq!(g.series[1].points, vec![(10.0, 2.0), (30.0, 0.0)]);
    }

    #[test]
    fn text_chart() {
        let g = Graph::new(Metric::RstPerConn, &rows(), "global");
        assert_eq!(
            g.text(11, 5),
            "RST per connection (global)
2.00 |          s
     |
     |s
     |          c
0.00 |c
     +-----------
      00:00:00.000 00:00:20.000 UTC
      c client   s server  (RST per closed connection)
"
        );
    }

    #[test]
    fn images_have_both_series() {
        let g = Graph::new(Metric::RstPerConn, &rows(), "global");
        let svg = g.svg().unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
        assert!(svg.contains(">\nclient\n</text>") && svg.contains(">\nserver\n</text>"));
        assert_eq!(
            svg.matches(r#"stroke-width="2""#).count(),
            2 + 2,
            "two series and their legend marks"
        );
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("g.png");
        g.png(&png).unwrap();
        let b = std::fs::read(&png).unwrap();
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n");
        let (w, h) = (
            u32::from_be_bytes(b[16..20].try_into().unwrap()),
            u32::from_be_bytes(b[20..24].try_into().unwrap()),
        );
        assert_eq!((w, h), SIZE);
    }
}
