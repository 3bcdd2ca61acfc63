//! The comparison's two charts as SVG (plotters, no system fonts needed).

use std::error::Error;
use std::path::Path;

use plotters::prelude::*;

/// One method's mean accuracies (in %, one per test set) and its trainable parameters.
pub struct MethodPoint {
    pub name: String,
    pub trainable: i64,
    pub means: Vec<f64>,
}

const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
];

fn range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(v), h.max(v)));
    if lo > hi {
        return 0.0..100.0;
    }
    (lo - 2.0).floor()..(hi + 2.0).ceil()
}

/// Accuracy per test set against trainable parameters (log axis); the zero-shot head (no
/// trained parameters) as a dashed line per test set. Method names label the first set's points.
pub fn accuracy_vs_params(
    path: &Path,
    title: &str,
    sets: &[String],
    points: &[MethodPoint],
) -> Result<(), Box<dyn Error>> {
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let trained: Vec<&MethodPoint> = points.iter().filter(|p| p.trainable > 0).collect();
    let zero: Option<&MethodPoint> = points.iter().find(|p| p.trainable == 0);
    let y = range(points.iter().flat_map(|p| p.means.iter().copied()));
    let x_max = trained.iter().map(|p| p.trainable).max().unwrap_or(1) as f64 * 12.0;
    let x_min = trained.iter().map(|p| p.trainable).min().unwrap_or(1) as f64 / 4.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{title}: accuracy vs trainable parameters"), ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d((x_min..x_max).log_scale(), y.clone())?;
    chart
        .configure_mesh()
        .x_desc("trainable parameters (log scale)")
        .y_desc("accuracy (%), mean over seeds")
        .light_line_style(RGBColor(238, 238, 238))
        .x_label_formatter(&|v| {
            if *v >= 1e6 {
                format!("{:.0}M", v / 1e6)
            } else if *v >= 1e3 {
                format!("{:.0}k", v / 1e3)
            } else {
                format!("{v:.0}")
            }
        })
        .draw()?;
    for (i, set) in sets.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(
                trained
                    .iter()
                    .map(|p| Circle::new((p.trainable as f64, p.means[i]), 5, color.filled())),
            )?
            .label(set.clone())
            .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
        if let Some(z) = zero {
            chart.draw_series(DashedLineSeries::new(
                [(x_min, z.means[i]), (x_max, z.means[i])],
                6,
                4,
                color.stroke_width(1),
            ))?;
        }
    }
    if let Some(z) = zero {
        chart.draw_series(std::iter::once(Text::new(
            "dashed: zero-shot head (0 trained)",
            (x_min * 1.1, z.means[0] + 0.3),
            ("sans-serif", 13),
        )))?;
    }
    // labels beside the first set's points, alternately above and below when neighbours crowd
    let mut sorted = trained.clone();
    sorted.sort_by_key(|p| p.trainable);
    for (k, p) in sorted.iter().enumerate() {
        let crowded = k > 0 && (p.trainable as f64 / sorted[k - 1].trainable as f64) < 3.0;
        let dy = if crowded && k % 2 == 1 { -1.2 } else { 0.5 };
        chart.draw_series(std::iter::once(Text::new(
            p.name.clone(),
            (p.trainable as f64 * 1.15, p.means[0] + dy),
            ("sans-serif", 13),
        )))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()?;
    root.present()?;
    Ok(())
}

/// The WiSE-FT curve: accuracy on each out-of-distribution set (y) against in-distribution
/// accuracy (x, the first set) for each α, one line per OOD set; the other methods as crosses
/// in the set's colour for reference.
pub fn wise_curve(
    path: &Path,
    title: &str,
    sets: &[String],
    curve: &[(f64, Vec<f64>)],
    points: &[MethodPoint],
) -> Result<(), Box<dyn Error>> {
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let x = range(curve.iter().map(|(_, a)| a[0]).chain(points.iter().map(|p| p.means[0])));
    let y = range(
        curve
            .iter()
            .flat_map(|(_, a)| a[1..].iter().copied())
            .chain(points.iter().flat_map(|p| p.means[1..].iter().copied())),
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{title}: WiSE-FT, zero-shot (α = 0) ↔ full fine-tuning (α = 1)"),
            ("sans-serif", 18),
        )
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc(format!("{} accuracy (%)", sets[0]))
        .y_desc("out-of-distribution accuracy (%)")
        .light_line_style(RGBColor(238, 238, 238))
        .draw()?;
    for (j, set) in sets.iter().enumerate().skip(1) {
        let color = COLORS[j % COLORS.len()];
        let line: Vec<(f64, f64)> = curve.iter().map(|(_, a)| (a[0], a[j])).collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
            .label(format!("{set} (WiSE-FT; crosses: other methods)"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(line.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        chart.draw_series(curve.iter().map(|(alpha, a)| {
            Text::new(format!("α={alpha}"), (a[0] + 0.1, a[j] + 0.15), ("sans-serif", 12))
        }))?;
        chart.draw_series(
            points
                .iter()
                .filter(|p| p.trainable > 0 && !p.name.starts_with("full"))
                .map(|p| Cross::new((p.means[0], p.means[j]), 5, color.stroke_width(2))),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()?;
    root.present()?;
    Ok(())
}
