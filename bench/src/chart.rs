//! The bench's PNG: RSS over time while the backlog drains, bounded against
//! unbounded, above the throughput of each consumer (log scale).
//!
//! Text needs a TrueType font, loaded as `streamctl chart` loads it: DejaVu
//! Sans from Debian's `fonts-dejavu-core` (override with `CHART_FONT`).

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

/// The font used for labels.
const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn register_font() -> anyhow::Result<()> {
    let path = std::env::var("CHART_FONT").unwrap_or_else(|_| DEFAULT_FONT.to_string());
    let bytes = std::fs::read(&path).with_context(|| {
        format!("cannot read the chart font {path} (install fonts-dejavu-core or set CHART_FONT)")
    })?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{path} is not a usable TrueType font"))
}

fn drawing<E: std::fmt::Display>(error: E) -> anyhow::Error {
    anyhow::anyhow!("chart: {error}")
}

/// One RSS line: its label and (seconds, MB) points.
pub struct RssSeries<'a> {
    /// Legend text.
    pub label: String,
    /// The samples.
    pub points: &'a [(f64, f64)],
}

/// Draws the chart into `output`. Either half may be empty (a phase not run);
/// the other is still drawn.
pub fn draw(
    rss: &[RssSeries<'_>],
    rss_limit_mb: f64,
    throughput: &[(String, f64)],
    output: &Path,
) -> anyhow::Result<()> {
    register_font()?;
    let root = BitMapBackend::new(output, (1200, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(drawing)?;
    let (top, bottom) = root.split_vertically(520);
    if rss.is_empty() {
        not_measured(&top, "memory")?;
    } else {
        draw_rss(&top, rss, rss_limit_mb)?;
    }
    if throughput.is_empty() {
        not_measured(&bottom, "throughput")?;
    } else {
        draw_throughput(&bottom, throughput)?;
    }
    root.present()
        .map_err(|error| anyhow::anyhow!("cannot write {}: {error}", output.display()))?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn not_measured(area: &Area<'_>, what: &str) -> anyhow::Result<()> {
    area.draw(&Text::new(
        format!("{what}: not measured in this run"),
        (40, 40),
        ("sans-serif", 20).into_font(),
    ))
    .map_err(drawing)
}

fn draw_rss(top: &Area<'_>, rss: &[RssSeries<'_>], rss_limit_mb: f64) -> anyhow::Result<()> {
    let span = rss
        .iter()
        .flat_map(|series| series.points.iter().map(|(time, _)| *time))
        .fold(1.0_f64, f64::max);
    let highest = rss
        .iter()
        .flat_map(|series| series.points.iter().map(|(_, mb)| *mb))
        .fold(rss_limit_mb, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(top)
        .caption(
            "processor RSS while draining the backlog",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..span, 0.0..highest)
        .map_err(drawing)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the processor started")
        .y_desc("RSS (MB)")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(drawing)?;
    let colors = [BLUE, RED, GREEN, MAGENTA];
    for (index, series) in rss.iter().enumerate() {
        let color = colors[index % colors.len()];
        chart
            .draw_series(LineSeries::new(
                series.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(drawing)?
            .label(series.label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .draw_series(LineSeries::new(
            [(0.0, rss_limit_mb), (span, rss_limit_mb)],
            BLACK.stroke_width(1),
        ))
        .map_err(drawing)?
        .label(format!("target {rss_limit_mb:.0} MB"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(1)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(drawing)?;
    Ok(())
}

fn draw_throughput(bottom: &Area<'_>, throughput: &[(String, f64)]) -> anyhow::Result<()> {
    let colors = [BLUE, RED, GREEN, MAGENTA];
    let positive: Vec<&(String, f64)> = throughput
        .iter()
        .filter(|(_, rate)| rate.is_finite() && *rate > 0.0)
        .collect();
    let lowest = positive
        .iter()
        .map(|(_, rate)| *rate)
        .fold(f64::INFINITY, f64::min)
        .min(1e6)
        / 4.0;
    let top_rate = positive.iter().map(|(_, rate)| *rate).fold(1.0, f64::max) * 6.0;
    let bars = positive.len().max(1) as f64;
    let mut chart = ChartBuilder::on(bottom)
        .caption("throughput, events/s (log scale)", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(10)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..bars, (lowest..top_rate).log_scale())
        .map_err(drawing)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|_| String::new())
        .y_desc("events/s")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(drawing)?;
    for (index, (name, rate)) in positive.iter().enumerate() {
        let left = index as f64 + 0.15;
        let right = index as f64 + 0.85;
        chart
            .draw_series([Rectangle::new(
                [(left, lowest), (right, *rate)],
                colors[index % colors.len()].mix(0.7).filled(),
            )])
            .map_err(drawing)?;
        chart
            .draw_series([
                Text::new(
                    name.clone(),
                    (left, rate * 2.4),
                    ("sans-serif", 15).into_font(),
                ),
                Text::new(
                    format!("{rate:.0}/s"),
                    (left, rate * 1.5),
                    ("sans-serif", 15).into_font(),
                ),
            ])
            .map_err(drawing)?;
    }
    Ok(())
}
