//! `ringpeer bench --plot DIR`: the bench's results as files people look
//! at: `report.json` (the full report), `latency.svg` (one-way latency
//! percentile curves, one line per path) and `throughput.svg` (1- and
//! 16-stream bulk throughput bars, the baselines beside the proxied paths).
//! Also the bench's progress bar.
//!
//! Invariants: the plots are drawn from the same [`PathReport`]s the JSON
//! holds, never from other numbers; a path without a curve (no samples) is
//! left out of the latency plot rather than drawn flat at zero.
//!
//! Choices: plotters with its SVG backend only. Text is written as SVG
//! `<text>` and sized by plotters' naive metrics (no `ttf`/`ab_glyph`
//! feature): the viewer's fonts render it, so no fontconfig, freetype or
//! font file is needed to build or run. Rejected: PNG (needs a rasterizer
//! and a font), and a hand-written SVG writer (axes, ticks and legends are
//! what a plotting crate is for).

use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use serde::Serialize;

use super::bench::PathReport;

/// One path to plot.
pub struct Series<'a> {
    /// Legend and bar label.
    pub name: &'a str,
    /// Its medians and percentile curve.
    pub report: &'a PathReport,
}

/// The quantiles of the latency curve (beyond p99.99 one run has too few
/// samples to say anything; the max is in the JSON).
pub const CURVE_QUANTILES: [f64; 10] = [0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999];

const W: u32 = 900;
const H: u32 = 540;
const PALETTE: [RGBColor; 6] = [
    RGBColor(110, 110, 110),
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

/// "Nines" of a quantile: 0.9 → 1, 0.99 → 2, 0.999 → 3 (the x axis).
fn nines(q: f64) -> f64 {
    -(1.0 - q).max(1e-9).log10()
}

fn nines_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    let s = format!("{p:.4}");
    format!("p{}", s.trim_end_matches('0').trim_end_matches('.'))
}

/// Writes `report.json`, `latency.svg` and `throughput.svg` into `dir`
/// (created if missing); returns the files written.
pub fn write(dir: &Path, title: &str, report: &impl Serialize, series: &[Series]) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let files = [
        ("report.json", serde_json::to_string_pretty(report)? + "\n"),
        ("latency.svg", latency_svg(title, series)?),
        ("throughput.svg", throughput_svg(title, series)?),
    ];
    let mut out = Vec::new();
    for (name, text) in files {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
        out.push(p);
    }
    Ok(out)
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}

/// One-way latency (µs, log scale) by percentile, one line per path.
pub fn latency_svg(title: &str, series: &[Series]) -> anyhow::Result<String> {
    let drawn: Vec<(usize, &Series)> = series.iter().enumerate().filter(|(_, s)| !s.report.curve.is_empty()).collect();
    let ys = || drawn.iter().flat_map(|(_, s)| s.report.curve.iter().map(|p| p[1]));
    let (lo, hi) = (ys().fold(f64::MAX, f64::min).max(0.1), ys().fold(0.0, f64::max).max(1.0));
    let x_max = CURVE_QUANTILES.iter().map(|q| nines(*q)).fold(0.0, f64::max);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{title}: one-way latency by percentile"), ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(nines(0.5)..x_max, (lo * 0.8..hi * 1.25).log_scale())
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("one-way latency, µs (RTT/2)")
            .x_labels(6)
            .x_label_formatter(&|x| nines_label(*x))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()
            .map_err(err)?;
        for (i, s) in drawn {
            let c = PALETTE[i % PALETTE.len()];
            let pts: Vec<(f64, f64)> = s.report.curve.iter().map(|p| (nines(p[0]), p[1])).collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                .map_err(err)?
                .label(s.name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled()))).map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// Bulk throughput bars (Gbit/s): per path, 1 stream (left) and 16
/// streams (right), each bar labelled with its value.
pub fn throughput_svg(title: &str, series: &[Series]) -> anyhow::Result<String> {
    let n = series.len() as u32;
    let top = series.iter().map(|s| s.report.bulk_gbps.max(s.report.bulk16_gbps)).fold(0.0, f64::max).max(0.1) * 1.2;
    let names: Vec<String> = series.iter().map(|s| s.name.to_string()).collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{title}: bulk throughput"), ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d((0..n.max(1)).into_segmented(), 0.0..top)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc("Gbit/s")
            .x_labels(n.max(1) as usize)
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .draw()
            .map_err(err)?;
        let bars = [("1 stream", 1usize), ("16 streams", 2usize)];
        for (label, k) in bars {
            let c = PALETTE[k];
            let value = move |s: &Series| if k == 1 { s.report.bulk_gbps } else { s.report.bulk16_gbps };
            let rects = series.iter().enumerate().map(move |(i, s)| {
                let i = i as u32;
                let (l, r) = if k == 1 {
                    (SegmentValue::Exact(i), SegmentValue::CenterOf(i))
                } else {
                    (SegmentValue::CenterOf(i), SegmentValue::Exact(i + 1))
                };
                let mut rect = Rectangle::new([(l, 0.0), (r, value(s))], c.filled());
                rect.set_margin(0, 0, 6, 6);
                rect
            });
            chart
                .draw_series(rects)
                .map_err(err)?
                .label(label)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()));
            let texts = series.iter().enumerate().map(move |(i, s)| {
                let at = if k == 1 { SegmentValue::Exact(i as u32) } else { SegmentValue::CenterOf(i as u32) };
                Text::new(format!("{:.2}", value(s)), (at, value(s) + top * 0.01), ("sans-serif", 13))
            });
            chart.draw_series(texts).map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// The bench's progress bar on stderr: `len` workload steps. Hidden when
/// stderr is not a terminal (CI logs, `2>file`), so logs keep one line per
/// run and no control characters; print through [`indicatif::ProgressBar::suspend`].
pub fn progress(len: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {msg} (eta {eta})")
        .map(|s| s.progress_chars("=> "));
    if let Ok(s) = style {
        pb.set_style(s);
    }
    pb
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::bench::Latency;

    fn path(p50: f64, gbps: f64) -> PathReport {
        PathReport {
            one_way: Latency { p50_us: p50, p99_us: p50 * 2.0, p999_us: p50 * 4.0, max_us: p50 * 10.0 },
            round_trip: Latency::default(),
            bulk_gbps: gbps,
            bulk16_gbps: gbps * 1.5,
            setup_per_s: 10_000.0,
            curve: CURVE_QUANTILES.iter().map(|q| [*q, p50 * (1.0 + nines(*q))]).collect(),
        }
    }

    #[test]
    fn a_fixed_result_set_plots_as_well_formed_svg_with_every_path() {
        let (d, l, o, p) = (path(9.0, 40.0), path(20.0, 12.0), path(24.0, 10.0), path(35.0, 8.0));
        let mut none = path(1.0, 1.0);
        none.curve.clear();
        let series = [
            Series { name: "direct TCP", report: &d },
            Series { name: "local shard", report: &l },
            Series { name: "other shard", report: &o },
            Series { name: "peer link", report: &p },
            Series { name: "no samples", report: &none },
        ];
        let dir = tempfile::tempdir().unwrap();
        let files = write(dir.path(), "fixed", &serde_json::json!({"paths": 5}), &series).unwrap();
        assert_eq!(files.len(), 3);
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&files[0]).unwrap()).unwrap();
        assert_eq!(json["paths"], 5);

        let svg = std::fs::read_to_string(&files[1]).unwrap();
        let doc = roxmltree::Document::parse(&svg).expect("latency.svg is well-formed XML");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let texts: Vec<String> = doc
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text().map(|t| t.trim().to_string()))
            .collect();
        for name in ["direct TCP", "local shard", "other shard", "peer link"] {
            assert!(texts.iter().any(|t| t == name), "legend lacks {name:?}: {texts:?}");
        }
        assert!(!texts.iter().any(|t| t == "no samples"), "a path without a curve is not drawn");
        assert!(texts.iter().any(|t| t == "p99.9"), "the x axis reads as percentiles: {texts:?}");
        // One line per drawn path (legend swatches are polylines too).
        let lines = doc.descendants().filter(|n| n.has_tag_name("polyline")).count();
        assert!(lines >= 4, "{lines} polylines for 4 curves");

        let svg = std::fs::read_to_string(&files[2]).unwrap();
        let doc = roxmltree::Document::parse(&svg).expect("throughput.svg is well-formed XML");
        let texts: Vec<String> = doc
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text().map(|t| t.trim().to_string()))
            .collect();
        for want in
            ["direct TCP", "peer link", "no samples", "40.00", "60.00", "8.00", "12.00", "1 stream", "16 streams"]
        {
            assert!(texts.iter().any(|t| t == want), "throughput lacks {want:?}: {texts:?}");
        }
        // 5 paths x 2 bars, plus the background, the plot area, the legend
        // box and its 2 swatches.
        let rects = doc.descendants().filter(|n| n.has_tag_name("rect")).count();
        assert!((10..=16).contains(&rects), "{rects} rects for 10 bars");
    }

    #[test]
    fn percentile_axis_labels() {
        assert_eq!(nines_label(1.0), "p90");
        assert_eq!(nines_label(2.0), "p99");
        assert_eq!(nines_label(3.0), "p99.9");
        assert!((nines(0.999) - 3.0).abs() < 1e-9);
    }
}
