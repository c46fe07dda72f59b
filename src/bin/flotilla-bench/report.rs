//! The figures of one harness run, and how they are written down: a
//! generated block of BENCHMARKS.md (between markers) and SVG plots.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;

/// The median of several runs, with min and max.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    /// The summary of `values` (at least one).
    pub fn of(values: &[f64]) -> Self {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Self {
            median: sorted[sorted.len() / 2],
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        }
    }

    /// "median (min–max)" with `decimals` and `unit`.
    pub fn show(&self, decimals: usize, unit: &str) -> String {
        format!(
            "{} {unit} ({}–{})",
            group(self.median, decimals),
            group(self.min, decimals),
            group(self.max, decimals)
        )
    }

    /// A ratio to the raw baseline: "0.37 (0.36–0.37) × raw".
    pub fn times_raw(&self) -> String {
        format!(
            "{} ({}–{}) × raw",
            group(self.median, 2),
            group(self.min, 2),
            group(self.max, 2)
        )
    }

    /// Figure `index` of each run's row of figures.
    pub fn column<const N: usize>(runs: &[[f64; N]], index: usize) -> Self {
        Self::of(&runs.iter().map(|run| run[index]).collect::<Vec<_>>())
    }
}

/// `value` with `decimals`, thousands grouped by commas.
pub fn group(value: f64, decimals: usize) -> String {
    let text = format!("{value:.decimals$}");
    let (whole, fraction) = text
        .split_once('.')
        .map_or((text.as_str(), None), |(w, f)| (w, Some(f)));
    let (sign, digits) = whole.strip_prefix('-').map_or(("", whole), |d| ("-", d));
    let mut grouped = String::new();
    for (n, digit) in digits.chars().enumerate() {
        if n > 0 && (digits.len() - n) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    match fraction {
        Some(fraction) => format!("{sign}{grouped}.{fraction}"),
        None => format!("{sign}{grouped}"),
    }
}

/// One row of a results table.
pub struct Row {
    pub figure: String,
    pub target: String,
    pub measured: String,
    /// Whether the target is met; `None` without a target.
    pub met: Option<bool>,
}

impl Row {
    /// A figure without a target.
    pub fn info(figure: impl Into<String>, measured: impl Into<String>) -> Self {
        Self {
            figure: figure.into(),
            target: String::new(),
            measured: measured.into(),
            met: None,
        }
    }

    /// A figure with its `target`, and whether it is `met`.
    pub fn goal(
        figure: impl Into<String>,
        target: impl Into<String>,
        measured: impl Into<String>,
        met: bool,
    ) -> Self {
        Self {
            target: target.into(),
            met: Some(met),
            ..Self::info(figure, measured)
        }
    }
}

/// Throughput of one configuration, for the plot.
pub struct ThroughputPoint {
    /// embedded, jetstream, raw jetstream, celery + redis.
    pub series: String,
    pub replicas: u32,
    pub rate: Stat,
}

/// Latency percentiles at one offered load, for the plot.
pub struct LatencyPoint {
    pub backend: String,
    pub load: u32,
    pub p50: Stat,
    pub p99: Stat,
    pub p999: Stat,
}

/// The daemon's footprint with some replicas, for the plot.
pub struct ScalePoint {
    pub replicas: u32,
    pub idle_rss_mb: Stat,
    pub load_rss_mb: Stat,
    pub idle_cpu_pct: Stat,
}

/// Everything one run of the harness measured.
#[derive(Default)]
pub struct Report {
    pub sections: Vec<(String, Vec<Row>, Vec<String>)>,
    pub throughput: Vec<ThroughputPoint>,
    pub latency: Vec<LatencyPoint>,
    pub scale: Vec<ScalePoint>,
}

impl Report {
    /// Adds `row` to section `title` (created on first use).
    pub fn row(&mut self, title: &str, row: Row) {
        println!(
            "== {title}: {}: {}{}",
            row.figure,
            row.measured,
            match row.met {
                Some(true) => " (target met)",
                Some(false) => " (TARGET MISSED)",
                None => "",
            }
        );
        self.section(title).0.push(row);
    }

    /// Adds a line of notes under section `title`'s table.
    pub fn note(&mut self, title: &str, note: String) {
        println!("== {title}: {note}");
        self.section(title).1.push(note);
    }

    fn section(&mut self, title: &str) -> (&mut Vec<Row>, &mut Vec<String>) {
        let index = match self.sections.iter().position(|(t, _, _)| t == title) {
            Some(index) => index,
            None => {
                self.sections
                    .push((title.to_string(), Vec::new(), Vec::new()));
                self.sections.len() - 1
            }
        };
        let (_, rows, notes) = &mut self.sections[index];
        (rows, notes)
    }

    /// The generated block: a header naming the machine and command, then
    /// a table per section, with its plots.
    pub fn markdown(&self, header: &str, plots: &[(&str, &str)]) -> String {
        let mut text = String::new();
        let _ = writeln!(text, "{BEGIN}\n\n{header}\n");
        for (title, rows, notes) in &self.sections {
            let _ = writeln!(text, "### {title}\n");
            if !rows.is_empty() {
                let _ = writeln!(
                    text,
                    "| figure | target | measured: median (min–max) | met |"
                );
                let _ = writeln!(text, "|---|---|---|---|");
                for row in rows {
                    let met = match row.met {
                        Some(true) => "yes",
                        Some(false) => "**no**",
                        None => "—",
                    };
                    let _ = writeln!(
                        text,
                        "| {} | {} | {} | {met} |",
                        row.figure,
                        if row.target.is_empty() {
                            "—"
                        } else {
                            &row.target
                        },
                        row.measured
                    );
                }
                text.push('\n');
            }
            for note in notes {
                let _ = writeln!(text, "{note}\n");
            }
            for (plot_title, file) in plots {
                if plot_title == title {
                    let _ = writeln!(text, "![{title}]({file})\n");
                }
            }
        }
        text.push_str(END);
        text.push('\n');
        text
    }
}

pub const BEGIN: &str =
    "<!-- flotilla-bench: begin. Generated by scripts/bench.sh; edit outside these markers. -->";
pub const END: &str = "<!-- flotilla-bench: end -->";

/// Replaces the generated block of `path` with `block` (appending it when
/// the file has none), leaving the rest as it was.
pub fn write_block(path: &Path, block: &str) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let updated = match (text.find(BEGIN), text.find(END)) {
        (Some(begin), Some(end)) if begin < end => {
            format!(
                "{}{block}{}",
                &text[..begin],
                &text[end + END.len()..].trim_start_matches('\n')
            )
        }
        _ => format!("{}\n{block}", text.trim_end()),
    };
    std::fs::write(path, updated).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_summarised_and_grouped() {
        let stat = Stat::of(&[3.0, 1.0, 2.0]);
        assert_eq!((stat.median, stat.min, stat.max), (2.0, 1.0, 3.0));
        assert_eq!(group(1_234_567.891, 1), "1,234,567.9");
        assert_eq!(group(999.0, 0), "999");
        assert_eq!(
            Stat::of(&[26_406.0, 24_085.0, 27_174.0]).show(0, "tasks/s"),
            "26,406 tasks/s (24,085–27,174)"
        );
    }

    #[test]
    fn the_block_replaces_only_what_is_between_the_markers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("B.md");
        std::fs::write(&path, format!("intro\n{BEGIN}\nold\n{END}\nafter\n")).unwrap();
        write_block(&path, &format!("{BEGIN}\nnew\n{END}\n")).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("intro\n{BEGIN}\nnew\n{END}\nafter\n")
        );
    }
}
