//! The Markdown table the bench prints.

/// How a figure compares with its target.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// No target: a baseline or an extra figure.
    None,
    /// Target met.
    Met,
    /// Target missed; the text says by how much.
    Missed(String),
    /// A negative control, and whether it showed what it should.
    Control(bool),
}

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured.
    pub measurement: String,
    /// Events it covered, if any.
    pub events: Option<u64>,
    /// Seconds it took, if any.
    pub seconds: Option<f64>,
    /// The figure with its unit (events/s, MB, ms, x).
    pub value: String,
    /// The target, as issue 7 states it.
    pub target: String,
    /// Met or not.
    pub verdict: Verdict,
}

/// At least `target`: met, or missed by how much.
pub fn at_least(value: f64, target: f64) -> Verdict {
    if value >= target {
        Verdict::Met
    } else {
        Verdict::Missed(format!("{:.0} % short", (target - value) / target * 100.0))
    }
}

/// At most `target`: met, or missed by how much.
pub fn at_most(value: f64, target: f64) -> Verdict {
    if value <= target {
        Verdict::Met
    } else {
        Verdict::Missed(format!("{:.0} % over", (value - target) / target * 100.0))
    }
}

/// A number with thousands separators.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.abs());
    let mut grouped = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    if value < 0.0 {
        format!("-{grouped}")
    } else {
        grouped
    }
}

/// Renders the rows as a Markdown table.
pub fn render(rows: &[Row]) -> String {
    let mut lines = vec![
        "| measurement | events | seconds | events/s or MB | target | met? |".to_string(),
        "|---|---:|---:|---:|---|---|".to_string(),
    ];
    for row in rows {
        let verdict = match &row.verdict {
            Verdict::None => "-".to_string(),
            Verdict::Met => "yes".to_string(),
            Verdict::Missed(by) => format!("**NO** ({by})"),
            Verdict::Control(true) => "control shows it".to_string(),
            Verdict::Control(false) => "**control does NOT show it**".to_string(),
        };
        lines.push(format!(
            "| {} | {} | {} | {} | {} | {} |",
            row.measurement,
            row.events
                .map(|events| thousands(events as f64))
                .unwrap_or_default(),
            row.seconds
                .map(|seconds| format!("{seconds:.2}"))
                .unwrap_or_default(),
            row.value,
            row.target,
            verdict
        ));
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_say_by_how_much() {
        assert_eq!(at_least(60.0, 50.0), Verdict::Met);
        assert_eq!(at_least(40.0, 50.0), Verdict::Missed("20 % short".into()));
        assert_eq!(at_most(100.0, 150.0), Verdict::Met);
        assert_eq!(at_most(300.0, 150.0), Verdict::Missed("100 % over".into()));
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(-1500.0), "-1,500");
    }

    #[test]
    fn renders_a_markdown_table() {
        let table = render(&[Row {
            measurement: "x".into(),
            events: Some(1000),
            seconds: Some(1.5),
            value: "10 ev/s".into(),
            target: ">= 5".into(),
            verdict: Verdict::Met,
        }]);
        assert!(table.contains("| x | 1,000 | 1.50 | 10 ev/s | >= 5 | yes |"));
    }
}
