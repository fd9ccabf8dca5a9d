//! SVG plots of benchmark results (plotters, SVG backend only).

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use crate::bench::Row;

/// Recall@10 (x) against p50 latency in µs (y, log scale), one line per engine.
pub fn recall_latency(path: &Path, title: &str, rows: &[Row]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let min_recall = rows.iter().map(|r| r.recall_at_10).fold(1.0, f64::min);
    let x0 = (min_recall - 0.01).clamp(0.0, 0.99);
    let (y0, y1) = rows.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), r| {
        (lo.min(r.p50_us), hi.max(r.p50_us))
    });
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(x0..1.0005f64, ((y0 * 0.8).max(0.1)..y1 * 1.25).log_scale())
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("recall@10")
        .y_desc("p50 latency (µs, log)")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let mut engines: Vec<&str> = rows.iter().map(|r| r.engine).collect();
    engines.dedup();
    engines.sort();
    engines.dedup();
    // Fixed, readable colours per engine (the first is tiervec's); others cycle.
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
    ];
    engines.sort_by_key(|e| (*e != "tiervec", *e));
    for (i, engine) in engines.iter().enumerate() {
        let color = palette[i % palette.len()].to_rgba();
        let mut points: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.engine == *engine)
            .map(|r| (r.recall_at_10, r.p50_us))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(*engine)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Latency distribution per source: percentile (y) against latency in µs (x, log scale).
pub fn latency_cdf(
    path: &Path,
    title: &str,
    per_source: &[(&str, crate::bench::Latencies)],
) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let quantiles: Vec<f64> = (0..=200)
        .map(|i| i as f64 / 200.0 * 0.999)
        .chain([0.9995, 0.9999])
        .collect();
    let curves: Vec<(&str, Vec<(f64, f64)>)> = per_source
        .iter()
        .map(|(source, lat)| {
            (
                *source,
                quantiles
                    .iter()
                    .map(|&q| (lat.percentile_us(q).max(1.0), q * 100.0))
                    .collect(),
            )
        })
        .collect();
    let (x0, x1) = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.0))
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        });
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(((x0 * 0.8).max(1.0)..x1 * 1.25).log_scale(), 0.0..100.0f64)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("latency at the application (µs, log)")
        .y_desc("percentile")
        .x_labels(8)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let palette = [
        RGBColor(44, 160, 44),
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
    ];
    for (i, (source, points)) in curves.into_iter().enumerate() {
        let color = palette[i % palette.len()].to_rgba();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(source)
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
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Recall@10 and local fraction (y) against the threshold (x), for the reported trace (solid)
/// and the calibration trace (dashed), with the chosen threshold and the measured point.
pub fn threshold_sweep(
    path: &Path,
    title: &str,
    x_desc: &str,
    reported: &[crate::demo::SweepPoint],
    calibration: &[crate::demo::SweepPoint],
    chosen: f64,
    measured: (f64, f64),
) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let x1 = reported
        .iter()
        .chain(calibration)
        .map(|p| p.threshold)
        .fold(chosen, f64::max)
        * 1.05;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0.0..x1, 0.0..1.02f64)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("fraction")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let recall = RGBColor(31, 119, 180).to_rgba();
    let local = RGBColor(44, 160, 44).to_rgba();
    for (points, dashed, name) in [
        (reported, false, "reported"),
        (calibration, true, "calibration"),
    ] {
        for (color, what, get) in [
            (
                recall,
                "recall@10",
                (|p: &crate::demo::SweepPoint| p.recall_at_10) as fn(&_) -> f64,
            ),
            (local, "local fraction", |p: &crate::demo::SweepPoint| {
                p.local_fraction
            }),
        ] {
            let line: Vec<(f64, f64)> = points.iter().map(|p| (p.threshold, get(p))).collect();
            let style = color.stroke_width(if dashed { 1 } else { 2 });
            let series = if dashed {
                chart.draw_series(DashedLineSeries::new(line, 6, 4, style))
            } else {
                chart.draw_series(LineSeries::new(line, style))
            };
            series
                .map_err(|e| anyhow!("{e}"))?
                .label(format!("{what} ({name} trace, predicted)"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
    }
    chart
        .draw_series(LineSeries::new(
            vec![(chosen, 0.0), (chosen, 1.02)],
            BLACK.mix(0.6).stroke_width(1),
        ))
        .map_err(|e| anyhow!("{e}"))?
        .label(format!("chosen threshold {chosen:.3}"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.6)));
    chart
        .draw_series([
            Circle::new((chosen, measured.0), 6, local.filled()),
            Circle::new((chosen, measured.1), 6, recall.filled()),
        ])
        .map_err(|e| anyhow!("{e}"))?
        .label("measured end to end (dots)")
        .legend(move |(x, y)| Circle::new((x + 10, y), 4, recall.filled()));
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Fractions over the course of a trace (x: requests per edge so far), one line each, with a
/// horizontal target line.
pub fn over_trace(
    path: &Path,
    title: &str,
    series: &[(&str, Vec<(f64, f64)>)],
    target: Option<(&str, f64)>,
) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let x1 = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0.0..x1, 0.0..1.02f64)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("requests per edge so far")
        .y_desc("fraction (per window)")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (i, (name, points)) in series.iter().enumerate() {
        let style = Palette99::pick(i).stroke_width(2);
        chart
            .draw_series(LineSeries::new(points.clone(), style))
            .map_err(|e| anyhow!("{e}"))?
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
            .map_err(|e| anyhow!("{e}"))?
            .label(name)
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.6)));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
