//! `streamctl chart`: a PNG of a run, from Prometheus: throughput, lag,
//! dead-lettered/s and the SLI over time, with marks (kills, say) as
//! vertical lines.
//!
//! Text needs a TrueType font: DejaVu Sans from Debian's `fonts-dejavu-core`
//! (override with `CHART_FONT`).

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use crate::prometheus::{http_get, url_encode};

/// The font used for labels.
const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// One line of a panel: its label and its points (seconds since the start, value).
#[derive(Debug, Clone, Default)]
pub struct Line {
    /// What the line is (shown in the legend when a panel has several).
    pub label: String,
    /// Points in time order.
    pub points: Vec<(f64, f64)>,
}

/// One panel: a title and its lines.
#[derive(Debug, Clone, Default)]
pub struct Panel {
    /// Panel title.
    pub title: String,
    /// Its lines, drawn in [`LINE_COLORS`] order.
    pub lines: Vec<Line>,
    /// Fit the y axis to the values (a ratio near 1) instead of starting at 0.
    pub fit: bool,
}

/// What one panel shows: its title, its (label, PromQL) lines, and whether
/// its y axis fits the values.
pub struct PanelSpec {
    /// Panel title.
    pub title: &'static str,
    /// (label, PromQL) per line.
    pub lines: &'static [(&'static str, &'static str)],
    /// See [`Panel::fit`].
    pub fit: bool,
}

/// What the chart shows. Rates over 5 s: the local Prometheus scrapes
/// every second, so a two-minute demo's kills show as dips, not as a blur.
/// The lag comes from `streamctl lag --serve` (job `lag-exporter`), which
/// reads the broker and keeps measuring while the processor is down.
pub const PANELS: [PanelSpec; 4] = [
    PanelSpec {
        title: "events stored / s",
        lines: &[("stored", "sum(rate(stream_events_processed_total[5s]))")],
        fit: false,
    },
    PanelSpec {
        title: "lag (records), read from the broker",
        lines: &[
            ("behind the committed offsets", "sum(stream_group_lag)"),
            (
                "behind the persisted checkpoint",
                "sum(stream_checkpoint_lag)",
            ),
        ],
        fit: false,
    },
    PanelSpec {
        title: "dead-lettered / s",
        lines: &[("dead-lettered", "sum(rate(stream_dlq_messages_total[5s]))")],
        fit: false,
    },
    PanelSpec {
        title: "success ratio (SLI) against the objective",
        lines: &[
            ("SLI sli:success:ratio5m", "sli:success:ratio5m"),
            ("objective slo:objective:ratio", "slo:objective:ratio"),
        ],
        fit: true,
    },
];

/// The lines' colours, in order.
const LINE_COLORS: [RGBColor; 2] = [BLUE, RGBColor(0, 150, 0)];

/// The marks' colours, in order (a mark's label is written in its colour).
const MARK_COLORS: [RGBColor; 4] = [
    RED,
    RGBColor(230, 120, 0),
    RGBColor(150, 0, 200),
    RGBColor(0, 140, 140),
];

/// Reads a range query as (seconds since `start`, value) points.
pub fn query_range(
    address: &str,
    expression: &str,
    start: f64,
    end: f64,
    step: f64,
) -> anyhow::Result<Vec<(f64, f64)>> {
    let path = format!(
        "/api/v1/query_range?query={}&start={start}&end={end}&step={step}",
        url_encode(expression)
    );
    let (status, body) = http_get(address, &path)
        .with_context(|| format!("cannot reach prometheus at {address}"))?;
    anyhow::ensure!(
        status == 200,
        "prometheus at {address} answered {status}: {body}"
    );
    let answer: serde_json::Value = serde_json::from_str(&body)?;
    let mut points = Vec::new();
    for value in answer["data"]["result"][0]["values"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let (Some(time), Some(number)) = (
            value[0].as_f64(),
            value[1].as_str().and_then(|text| text.parse::<f64>().ok()),
        ) else {
            continue;
        };
        if number.is_finite() {
            points.push((time - start, number));
        }
    }
    Ok(points)
}

fn register_font() -> anyhow::Result<()> {
    let path = std::env::var("CHART_FONT").unwrap_or_else(|_| DEFAULT_FONT.to_string());
    let bytes = std::fs::read(&path).with_context(|| {
        format!("cannot read the chart font {path} (install fonts-dejavu-core or set CHART_FONT)")
    })?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{path} is not a usable TrueType font"))
}

/// Draws the panels, one above the other, with `marks` (seconds since the
/// start, label) as vertical lines through every panel, each labelled at
/// the top of the first panel (staggered, so marks close in time stay
/// legible), into a PNG at `output`.
pub fn draw(panels: &[Panel], marks: &[(f64, String)], output: &Path) -> anyhow::Result<()> {
    register_font()?;
    let failed = |error: &dyn std::fmt::Display| anyhow::anyhow!("{error}");
    let width = 1000;
    let height = 260 * panels.len().max(1) as u32;
    let root = BitMapBackend::new(output, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|error| failed(&error))?;
    let areas = root.split_evenly((panels.len().max(1), 1));
    let points = |panel: &Panel| -> Vec<(f64, f64)> {
        panel
            .lines
            .iter()
            .flat_map(|line| line.points.iter().copied())
            .collect()
    };
    let span = panels
        .iter()
        .flat_map(|panel| points(panel).into_iter().map(|(time, _)| time))
        .chain(marks.iter().map(|(time, _)| *time))
        .fold(1.0_f64, f64::max);
    for (index, (area, panel)) in areas.iter().zip(panels).enumerate() {
        let values: Vec<f64> = points(panel).into_iter().map(|(_, value)| value).collect();
        let (lowest, top) = y_range(&values, panel.fit);
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..span, lowest..top)
            .map_err(|error| failed(&error))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(|error| failed(&error))?;
        for (order, (time, _)) in marks.iter().enumerate() {
            let color = MARK_COLORS[order % MARK_COLORS.len()];
            chart
                .draw_series(LineSeries::new(
                    [(*time, lowest), (*time, top)],
                    color.stroke_width(2),
                ))
                .map_err(|error| failed(&error))?;
        }
        for (line, color) in panel.lines.iter().zip(LINE_COLORS.iter().cycle()) {
            let drawn = chart
                .draw_series(LineSeries::new(
                    line.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|error| failed(&error))?;
            if panel.lines.len() > 1 {
                drawn.label(line.label.as_str()).legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                });
            }
        }
        if panel.lines.len() > 1 {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 12))
                .draw()
                .map_err(|error| failed(&error))?;
        }
        if index == 0 {
            for (order, (time, label)) in marks.iter().enumerate() {
                let color = MARK_COLORS[order % MARK_COLORS.len()];
                let height = top - lowest;
                let y = top - height * (0.06 + 0.12 * (order % 4) as f64);
                chart
                    .draw_series(std::iter::once(Text::new(
                        format!(" {label} ({time:.0} s)"),
                        (*time, y),
                        ("sans-serif", 13).into_font().color(&color),
                    )))
                    .map_err(|error| failed(&error))?;
            }
        }
    }
    root.present()
        .map_err(|error| anyhow::anyhow!("cannot write {}: {error}", output.display()))?;
    Ok(())
}

/// The y axis: from 0 (or, fitted, from just below the lowest value) to a
/// little above the highest; never empty.
fn y_range(values: &[f64], fit: bool) -> (f64, f64) {
    let highest = values.iter().copied().fold(f64::MIN, f64::max);
    let lowest = values.iter().copied().fold(f64::MAX, f64::min);
    if values.is_empty() {
        return (0.0, 1.0);
    }
    if fit {
        let margin = ((highest - lowest) * 0.15).max(0.001);
        return (lowest - margin, highest + margin);
    }
    let lowest = lowest.min(0.0);
    if highest > lowest {
        (lowest, highest * 1.15)
    } else {
        (lowest, lowest + 1.0)
    }
}

/// Reads every panel for `[start, end]` (Unix seconds) from Prometheus and draws them.
pub fn chart_from_prometheus(
    address: &str,
    start: f64,
    end: f64,
    marks: &[(f64, String)],
    output: &Path,
) -> anyhow::Result<()> {
    let step = ((end - start) / 300.0).max(1.0);
    let mut panels = Vec::new();
    for spec in PANELS {
        let mut lines = Vec::new();
        for (label, expression) in spec.lines {
            lines.push(Line {
                label: label.to_string(),
                points: query_range(address, expression, start, end, step)?,
            });
        }
        panels.push(Panel {
            title: spec.title.to_string(),
            lines,
            fit: spec.fit,
        });
    }
    let relative_marks: Vec<(f64, String)> = marks
        .iter()
        .map(|(time, label)| (time - start, label.clone()))
        .collect();
    draw(&panels, &relative_marks, output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fitted_axis_shows_a_ratio_near_1_and_others_start_at_0() {
        let (low, high) = y_range(&[0.995, 0.99, 1.0], true);
        assert!(low > 0.98 && low < 0.99, "{low}");
        assert!(high > 1.0 && high < 1.01, "{high}");
        assert_eq!(y_range(&[5.0, 10.0], false), (0.0, 11.5));
        assert_eq!(y_range(&[], false), (0.0, 1.0));
        assert_eq!(y_range(&[0.0, 0.0], false), (0.0, 1.0));
    }

    #[test]
    fn draws_a_png_with_marks() {
        let output = std::env::temp_dir().join(format!("chart-test-{}.png", std::process::id()));
        let panels: Vec<Panel> = PANELS
            .iter()
            .enumerate()
            .map(|(index, spec)| Panel {
                title: spec.title.to_string(),
                fit: spec.fit,
                lines: spec
                    .lines
                    .iter()
                    .map(|(label, _)| Line {
                        label: label.to_string(),
                        points: (0..60)
                            .map(|second| (second as f64, (second * (index + 1)) as f64))
                            .collect(),
                    })
                    .collect(),
            })
            .collect();
        let marks = [(30.0, "kill".to_string()), (31.0, "SIGKILL".to_string())];
        draw(&panels, &marks, &output).expect("draws");
        let bytes = std::fs::read(&output).expect("png written");
        assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
        assert!(
            bytes.len() > 10_000,
            "suspiciously small: {} bytes",
            bytes.len()
        );
        let _ = std::fs::remove_file(output);
    }
}
