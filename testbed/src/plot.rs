//! SVG plots (plotters, SVG backend only). Every plot takes plain series — a name and its
//! `(x, y)` points — so it knows nothing of what was measured: the benches and the demo turn
//! their figures into series.

use std::fmt::Display;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

/// A named line: `(x, y)` points in drawing order.
pub type Series<'a> = (&'a str, Vec<(f64, f64)>);

/// Why a plot was not written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("creating {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("drawing {path}: {message}")]
    Drawing { path: PathBuf, message: String },
}

/// Creates the folder of `path` and returns the mapping of plotters' errors for it.
fn prepare(path: &Path) -> Result<impl Fn(&dyn Display) -> PlotError + '_, PlotError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| PlotError::Io {
            path: dir.to_owned(),
            source,
        })?;
    }
    Ok(move |e: &dyn Display| PlotError::Drawing {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Recall@10 (x) against p50 latency in µs (y, log scale), one line per engine, in the
/// colours of a fixed palette in the order given (the first is tiervec's).
pub fn recall_latency(path: &Path, title: &str, engines: &[Series<'_>]) -> Result<(), PlotError> {
    let fail = prepare(path)?;
    let points = || engines.iter().flat_map(|(_, p)| p.iter().copied());
    let min_recall = points().map(|p| p.0).fold(1.0, f64::min);
    let x0 = (min_recall - 0.01).clamp(0.0, 0.99);
    let (y0, y1) = points().fold((f64::INFINITY, 0.0f64), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(x0..1.0005f64, ((y0 * 0.8).max(0.1)..y1 * 1.25).log_scale())
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("recall@10")
        .y_desc("p50 latency (µs, log)")
        .draw()
        .map_err(|e| fail(&e))?;
    // Fixed, readable colours per engine; others cycle.
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
    ];
    for (i, (engine, points)) in engines.iter().enumerate() {
        let color = palette[i % palette.len()].to_rgba();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| fail(&e))?
            .label(*engine)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(|e| fail(&e))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}

/// Latency distribution per source: percentile (y, 0..100) against latency in µs (x, log
/// scale, at least 1).
pub fn latency_cdf(path: &Path, title: &str, curves: &[Series<'_>]) -> Result<(), PlotError> {
    let fail = prepare(path)?;
    let (x0, x1) = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.0))
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        });
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(((x0 * 0.8).max(1.0)..x1 * 1.25).log_scale(), 0.0..100.0f64)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("latency at the application (µs, log)")
        .y_desc("percentile")
        .x_labels(8)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| fail(&e))?;
    let palette = [
        RGBColor(44, 160, 44),
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
    ];
    for (i, (source, points)) in curves.iter().enumerate() {
        let color = palette[i % palette.len()].to_rgba();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| fail(&e))?
            .label(*source)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}

/// The two lines of a threshold sweep over one trace, each as `(threshold, fraction)` points.
#[derive(Debug, Clone, Default)]
pub struct SweepLines {
    pub recall_at_10: Vec<(f64, f64)>,
    pub local_fraction: Vec<(f64, f64)>,
}

/// Recall@10 and local fraction (y) against the threshold (x) of the rule in use, over the
/// whole reported trace (solid) and its second half, once the caches warmed (dashed), with the
/// chosen threshold and the measured point `(local fraction, recall@10)`.
pub fn threshold_sweep(
    path: &Path,
    title: &str,
    x_desc: &str,
    reported: &SweepLines,
    warm: &SweepLines,
    chosen: f64,
    measured: (f64, f64),
) -> Result<(), PlotError> {
    let fail = prepare(path)?;
    let x1 = [reported, warm]
        .iter()
        .flat_map(|l| l.recall_at_10.iter().chain(&l.local_fraction))
        .map(|p| p.0)
        .fold(chosen, f64::max)
        * 1.05;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0.0..x1, 0.0..1.02f64)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("fraction")
        .draw()
        .map_err(|e| fail(&e))?;
    let recall = RGBColor(31, 119, 180).to_rgba();
    let local = RGBColor(44, 160, 44).to_rgba();
    for (lines, dashed, name) in [
        (reported, false, "whole"),
        (warm, true, "second half of the"),
    ] {
        for (color, what, line) in [
            (recall, "recall@10", &lines.recall_at_10),
            (local, "local fraction", &lines.local_fraction),
        ] {
            let line = line.clone();
            let style = color.stroke_width(if dashed { 1 } else { 2 });
            let series = if dashed {
                chart.draw_series(DashedLineSeries::new(line, 6, 4, style))
            } else {
                chart.draw_series(LineSeries::new(line, style))
            };
            series
                .map_err(|e| fail(&e))?
                .label(format!("{what} ({name} trace, predicted)"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
    }
    chart
        .draw_series(LineSeries::new(
            vec![(chosen, 0.0), (chosen, 1.02)],
            BLACK.mix(0.6).stroke_width(1),
        ))
        .map_err(|e| fail(&e))?
        .label(format!("chosen threshold {chosen:.3}"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.6)));
    chart
        .draw_series([
            Circle::new((chosen, measured.0), 6, local.filled()),
            Circle::new((chosen, measured.1), 6, recall.filled()),
        ])
        .map_err(|e| fail(&e))?
        .label("measured end to end (dots)")
        .legend(move |(x, y)| Circle::new((x + 10, y), 4, recall.filled()));
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}

/// Fractions over the course of a trace (x: requests per edge so far), one line each, with a
/// horizontal target line.
pub fn over_trace(
    path: &Path,
    title: &str,
    series: &[Series<'_>],
    target: Option<(&str, f64)>,
) -> Result<(), PlotError> {
    let fail = prepare(path)?;
    let x1 = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0.0..x1, 0.0..1.02f64)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("requests per edge so far")
        .y_desc("fraction (per window)")
        .draw()
        .map_err(|e| fail(&e))?;
    for (i, (name, points)) in series.iter().enumerate() {
        let style = Palette99::pick(i).stroke_width(2);
        chart
            .draw_series(LineSeries::new(points.clone(), style))
            .map_err(|e| fail(&e))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    if let Some((name, y)) = target {
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, y), (x1, y)],
                6,
                4,
                BLACK.mix(0.6).stroke_width(1),
            ))
            .map_err(|e| fail(&e))?
            .label(name)
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.6)));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}
