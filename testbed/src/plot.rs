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
