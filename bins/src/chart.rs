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

/// One panel: a title and its points (seconds since the start, value).
#[derive(Debug, Clone, Default)]
pub struct Panel {
    /// Panel title.
    pub title: String,
    /// Points in time order.
    pub points: Vec<(f64, f64)>,
}

/// What the chart shows.
pub const PANELS: [(&str, &str); 4] = [
    (
        "events stored / s",
        "sum(rate(stream_events_processed_total[15s]))",
    ),
    ("consumer lag (records)", "sum(stream_consumer_lag)"),
    (
        "dead-lettered / s",
        "sum(rate(stream_dlq_messages_total[15s]))",
    ),
    ("SLI sli:success:ratio5m", "sli:success:ratio5m"),
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
/// start, label) as red vertical lines, into a PNG at `output`.
pub fn draw(panels: &[Panel], marks: &[(f64, String)], output: &Path) -> anyhow::Result<()> {
    register_font()?;
    let width = 1000;
    let height = 260 * panels.len().max(1) as u32;
    let root = BitMapBackend::new(output, (width, height)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    let areas = root.split_evenly((panels.len().max(1), 1));
    let span = panels
        .iter()
        .flat_map(|panel| panel.points.iter().map(|(time, _)| *time))
        .chain(marks.iter().map(|(time, _)| *time))
        .fold(1.0_f64, f64::max);
    for (area, panel) in areas.iter().zip(panels) {
        let highest = panel
            .points
            .iter()
            .map(|(_, value)| *value)
            .fold(0.0_f64, f64::max);
        let lowest = panel
            .points
            .iter()
            .map(|(_, value)| *value)
            .fold(highest, f64::min)
            .min(0.0);
        let top = if highest > lowest {
            highest * 1.1
        } else {
            lowest + 1.0
        };
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..span, lowest..top)
            .map_err(|error| anyhow::anyhow!("{error}"))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(|error| anyhow::anyhow!("{error}"))?;
        chart
            .draw_series(LineSeries::new(panel.points.iter().copied(), &BLUE))
            .map_err(|error| anyhow::anyhow!("{error}"))?;
        for (time, label) in marks {
            chart
                .draw_series(LineSeries::new(
                    [(*time, lowest), (*time, top)],
                    RED.stroke_width(2),
                ))
                .map_err(|error| anyhow::anyhow!("{error}"))?
                .label(label.as_str());
        }
    }
    root.present()
        .map_err(|error| anyhow::anyhow!("cannot write {}: {error}", output.display()))?;
    Ok(())
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
    for (title, expression) in PANELS {
        panels.push(Panel {
            title: title.to_string(),
            points: query_range(address, expression, start, end, step)?,
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
    fn draws_a_png_with_marks() {
        let output = std::env::temp_dir().join(format!("chart-test-{}.png", std::process::id()));
        let panels: Vec<Panel> = PANELS
            .iter()
            .enumerate()
            .map(|(index, (title, _))| Panel {
                title: title.to_string(),
                points: (0..60)
                    .map(|second| (second as f64, (second * (index + 1)) as f64))
                    .collect(),
            })
            .collect();
        draw(&panels, &[(30.0, "kill".to_string())], &output).expect("draws");
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
