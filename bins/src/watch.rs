//! `streamctl watch`: a live view of the pipeline from Prometheus: rates,
//! lag, mailbox depth against capacity, restarts, the SLI and the error
//! budget left, refreshed every second while you kill actors.
//!
//! On a terminal it draws with ratatui (works over SSH; `q`, Esc or Ctrl-C
//! quits and restores the terminal). When stdout is not a terminal it prints
//! one plain line per refresh instead.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use crate::prometheus::{query, query_scalar};

/// One refresh's figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Whether Prometheus sees the processor up.
    pub processor_up: Option<f64>,
    /// Events stored per second (30 s rate).
    pub processed_per_second: Option<f64>,
    /// Records read per second.
    pub consumed_per_second: Option<f64>,
    /// Dead letters per second.
    pub dead_lettered_per_second: Option<f64>,
    /// Records behind the end, all partitions.
    pub lag: Option<f64>,
    /// Per actor: depth and capacity of its mailbox.
    pub mailboxes: BTreeMap<String, (f64, f64)>,
    /// Actor restarts so far.
    pub restarts: Option<f64>,
    /// `sli:success:ratio5m`.
    pub sli: Option<f64>,
    /// `slo:error_budget:remaining1h`.
    pub budget_left: Option<f64>,
}

/// Reads the figures from Prometheus at `address` (host:port).
pub fn snapshot(address: &str) -> anyhow::Result<Snapshot> {
    let mut mailboxes: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (labels, depth) in query(address, "max by (actor) (stream_mailbox_depth)")? {
        mailboxes
            .entry(labels.get("actor").cloned().unwrap_or_default())
            .or_default()
            .0 = depth;
    }
    for (labels, capacity) in query(address, "max by (actor) (stream_mailbox_capacity)")? {
        mailboxes
            .entry(labels.get("actor").cloned().unwrap_or_default())
            .or_default()
            .1 = capacity;
    }
    Ok(Snapshot {
        processor_up: query_scalar(address, "max(up{job=\"processor\"})")?,
        processed_per_second: query_scalar(
            address,
            "sum(rate(stream_events_processed_total[30s]))",
        )?,
        consumed_per_second: query_scalar(address, "sum(rate(stream_events_consumed_total[30s]))")?,
        dead_lettered_per_second: query_scalar(
            address,
            "sum(rate(stream_dlq_messages_total[30s]))",
        )?,
        // From the lag exporter: it keeps reading while the processor is down.
        lag: query_scalar(address, "sum(stream_group_lag)")?,
        mailboxes,
        restarts: query_scalar(address, "sum(stream_actor_restarts_total)")?,
        sli: query_scalar(address, "sli:success:ratio5m")?,
        budget_left: query_scalar(address, "slo:error_budget:remaining1h")?,
    })
}

fn figure(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_string(), |number| format!("{number:.decimals$}"))
}

impl Snapshot {
    /// The plain one-line form.
    pub fn line(&self) -> String {
        let mailboxes: Vec<String> = self
            .mailboxes
            .iter()
            .map(|(actor, (depth, capacity))| format!("{actor}={depth:.0}/{capacity:.0}"))
            .collect();
        format!(
            "up={} processed/s={} consumed/s={} dlq/s={} lag={} mailboxes[{}] restarts={} sli={} budget_left={}",
            figure(self.processor_up, 0),
            figure(self.processed_per_second, 0),
            figure(self.consumed_per_second, 0),
            figure(self.dead_lettered_per_second, 1),
            figure(self.lag, 0),
            mailboxes.join(" "),
            figure(self.restarts, 0),
            figure(self.sli, 4),
            figure(self.budget_left.map(|left| left * 100.0), 1) + "%",
        )
    }
}

/// Runs the view until quit, or for `iterations` refreshes when given.
pub fn run(address: &str, iterations: Option<u64>) -> anyhow::Result<()> {
    if std::io::stdout().is_terminal() {
        run_terminal(address, iterations)
    } else {
        for iteration in 0.. {
            if iterations.is_some_and(|limit| iteration >= limit) {
                break;
            }
            if iteration > 0 {
                std::thread::sleep(Duration::from_secs(1));
            }
            match snapshot(address) {
                Ok(current) => println!("{}", current.line()),
                Err(error) => println!("error: {error:#}"),
            }
        }
        Ok(())
    }
}

fn run_terminal(address: &str, iterations: Option<u64>) -> anyhow::Result<()> {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
    use ratatui::layout::{Constraint, Layout};
    use ratatui::style::{Color, Style};
    use ratatui::widgets::{Block, Borders, Gauge, Paragraph, Sparkline};

    let mut terminal = ratatui::init();
    let mut history: Vec<u64> = Vec::new();
    let mut last: Result<Snapshot, String> = Err("waiting for the first refresh".to_string());
    let mut refreshed = 0u64;
    let mut next_refresh = Instant::now();
    let outcome = loop {
        if Instant::now() >= next_refresh {
            if iterations.is_some_and(|limit| refreshed >= limit) {
                break Ok(());
            }
            last = snapshot(address).map_err(|error| format!("{error:#}"));
            if let Ok(current) = &last {
                history.push(current.processed_per_second.unwrap_or(0.0) as u64);
                if history.len() > 200 {
                    history.remove(0);
                }
            }
            refreshed += 1;
            next_refresh = Instant::now() + Duration::from_secs(1);
        }
        let drawn = terminal.draw(|frame| {
            let areas = Layout::vertical([
                Constraint::Length(7),
                Constraint::Length(3 + 2 * 3),
                Constraint::Min(5),
                Constraint::Length(1),
            ])
            .split(frame.area());
            let text = match &last {
                Ok(current) => format!(
                    "processor up: {}   restarts: {}\nprocessed/s: {}   consumed/s: {}   dead-lettered/s: {}\nlag (from the broker, streamctl lag): {}\nSLI (sli:success:ratio5m): {} (target 0.99)\nerror budget left (1h): {}%",
                    figure(current.processor_up, 0),
                    figure(current.restarts, 0),
                    figure(current.processed_per_second, 0),
                    figure(current.consumed_per_second, 0),
                    figure(current.dead_lettered_per_second, 1),
                    figure(current.lag, 0),
                    figure(current.sli, 4),
                    figure(current.budget_left.map(|left| left * 100.0), 1),
                ),
                Err(error) => format!("prometheus {address}: {error}"),
            };
            frame.render_widget(
                Paragraph::new(text).block(Block::default().borders(Borders::ALL).title(" stream pipeline ")),
                areas[0],
            );
            let mailbox_block = Block::default().borders(Borders::ALL).title(" mailbox depth / capacity ");
            let inner = mailbox_block.inner(areas[1]);
            frame.render_widget(mailbox_block, areas[1]);
            if let Ok(current) = &last {
                let rows = Layout::vertical(vec![Constraint::Length(2); current.mailboxes.len().max(1)]).split(inner);
                for (row, (actor, (depth, capacity))) in rows.iter().zip(current.mailboxes.iter()) {
                    let ratio = if *capacity > 0.0 { (depth / capacity).clamp(0.0, 1.0) } else { 0.0 };
                    frame.render_widget(
                        Gauge::default()
                            .gauge_style(Style::default().fg(if ratio >= 1.0 { Color::Red } else { Color::Green }))
                            .ratio(ratio)
                            .label(format!("{actor}: {depth:.0}/{capacity:.0}")),
                        *row,
                    );
                }
            }
            frame.render_widget(
                Sparkline::default()
                    .block(Block::default().borders(Borders::ALL).title(" processed/s "))
                    .data(&history),
                areas[2],
            );
            frame.render_widget(Paragraph::new("q, Esc or Ctrl-C quits"), areas[3]);
        });
        if let Err(error) = drawn {
            break Err(anyhow::anyhow!("cannot draw: {error}"));
        }
        let wait = next_refresh
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(250));
        match event::poll(wait) {
            Ok(true) => {
                if let Ok(Event::Key(key)) = event::read() {
                    let control_c = key.code == KeyCode::Char('c')
                        && key.modifiers.contains(KeyModifiers::CONTROL);
                    if matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || control_c {
                        break Ok(());
                    }
                }
            }
            Ok(false) => {}
            Err(error) => break Err(anyhow::anyhow!("cannot read the terminal: {error}")),
        }
    };
    ratatui::restore();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_line_names_every_figure() {
        let snapshot = Snapshot {
            processor_up: Some(1.0),
            processed_per_second: Some(1234.4),
            consumed_per_second: Some(1240.0),
            dead_lettered_per_second: Some(6.2),
            lag: Some(0.0),
            mailboxes: BTreeMap::from([("sink".to_string(), (3.0, 8.0))]),
            restarts: Some(0.0),
            sli: Some(0.99502),
            budget_left: Some(0.5),
        };
        assert_eq!(
            snapshot.line(),
            "up=1 processed/s=1234 consumed/s=1240 dlq/s=6.2 lag=0 mailboxes[sink=3/8] restarts=0 sli=0.9950 budget_left=50.0%"
        );
        assert!(Snapshot::default().line().contains("sli=-"));
    }
}
