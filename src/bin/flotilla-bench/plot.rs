//! SVG bar charts of the figures (plotters' SVG backend, no fonts needed).

use std::path::Path;

use plotters::prelude::*;

use crate::report::Stat;

const COLORS: [RGBColor; 6] = [
    RGBColor(9, 105, 218),
    RGBColor(26, 127, 55),
    RGBColor(154, 103, 0),
    RGBColor(130, 80, 223),
    RGBColor(191, 135, 0),
    RGBColor(87, 96, 106),
];

/// A grouped bar chart: one group per entry of `groups`, one bar per
/// series with its median as the bar and min–max as a whisker; a missing
/// value leaves a gap. `log` draws the value axis on a log scale;
/// `target` draws a dashed line with its label.
pub struct Bars<'a> {
    pub title: &'a str,
    pub unit: &'a str,
    pub groups: Vec<String>,
    pub series: Vec<String>,
    /// `values[group][series]`.
    pub values: Vec<Vec<Option<Stat>>>,
    pub log: bool,
    pub target: Option<(f64, String)>,
}

impl Bars<'_> {
    /// Draws the chart into `path` (SVG, 900×420).
    pub fn draw(&self, path: &Path) -> anyhow::Result<()> {
        let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let present: Vec<Stat> = self.values.iter().flatten().flatten().copied().collect();
        let mut top = present.iter().map(|s| s.max).fold(0.0, f64::max);
        if let Some((target, _)) = &self.target {
            top = top.max(*target);
        }
        let top = if top > 0.0 { top * 1.15 } else { 1.0 };
        let groups = self.groups.len().max(1);
        let width = self.series.len().max(1) as f64;
        let labels = self.groups.clone();
        let x_range = 0.0..groups as f64;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(self.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70);
        let bottom = if self.log {
            present
                .iter()
                .map(|s| s.min)
                .fold(f64::INFINITY, f64::min)
                .min(top)
                / 2.0
        } else {
            0.0
        };
        let bar = |chart_x: f64, index: usize| -> (f64, f64) {
            let slot = 0.8 / width;
            let left = chart_x + 0.1 + slot * index as f64;
            (left + slot * 0.1, left + slot * 0.9)
        };
        macro_rules! fill {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .disable_x_mesh()
                    .x_labels(groups * 2 + 1)
                    .x_label_formatter(&|x: &f64| {
                        let centre = x - 0.5;
                        if (centre - centre.round()).abs() < 1e-6 {
                            labels
                                .get(centre.round() as usize)
                                .cloned()
                                .unwrap_or_default()
                        } else {
                            String::new()
                        }
                    })
                    .y_label_formatter(&|v: &f64| {
                        if *v >= 10.0 || *v == 0.0 {
                            crate::report::group(*v, 0)
                        } else {
                            format!("{v:.1}")
                        }
                    })
                    .y_desc(self.unit)
                    .draw()
                    .map_err(plot_error)?;
                for (index, name) in self.series.iter().enumerate() {
                    let color = COLORS[index % COLORS.len()];
                    let mut rectangles = Vec::new();
                    let mut whiskers = Vec::new();
                    for (group, row) in self.values.iter().enumerate() {
                        if let Some(Some(stat)) = row.get(index) {
                            let (left, right) = bar(group as f64, index);
                            rectangles.push(Rectangle::new(
                                [(left, bottom), (right, stat.median.max(bottom))],
                                color.filled(),
                            ));
                            let middle = (left + right) / 2.0;
                            whiskers.push(PathElement::new(
                                vec![
                                    (middle, stat.min.max(bottom)),
                                    (middle, stat.max.max(bottom)),
                                ],
                                BLACK.stroke_width(2),
                            ));
                        }
                    }
                    chart
                        .draw_series(rectangles)
                        .map_err(plot_error)?
                        .label(name.as_str())
                        .legend(move |(x, y)| {
                            Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                        });
                    chart.draw_series(whiskers).map_err(plot_error)?;
                }
                if let Some((target, label)) = &self.target {
                    let red = RGBColor(207, 34, 46);
                    chart
                        .draw_series(std::iter::once(PathElement::new(
                            vec![(0.0, *target), (groups as f64, *target)],
                            red.stroke_width(2),
                        )))
                        .map_err(plot_error)?
                        .label(label.as_str())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 12, y)], red.stroke_width(2))
                        });
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK.mix(0.3))
                    .position(SeriesLabelPosition::UpperLeft)
                    .draw()
                    .map_err(plot_error)?;
            }};
        }
        if self.log {
            fill!(
                builder
                    .build_cartesian_2d(x_range, (bottom..top).log_scale())
                    .map_err(plot_error)?
            );
        } else {
            fill!(
                builder
                    .build_cartesian_2d(x_range, bottom..top)
                    .map_err(plot_error)?
            );
        }
        root.present().map_err(plot_error)?;
        Ok(())
    }
}

fn plot_error(error: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("plotting: {error}")
}
