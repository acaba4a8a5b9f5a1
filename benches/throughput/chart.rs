//! `target/bench/throughput.svg`: every row's rate as a bar (with its ratio to raw), and the cost
//! growth: the RocksDB and PostgreSQL rows' rate and peak RSS against the entries the store
//! held before the row.

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use super::{Res, Row};

const BLUE: RGBColor = RGBColor(58, 123, 213);
const GREY: RGBColor = RGBColor(136, 136, 136);
const ORANGE: RGBColor = RGBColor(221, 120, 40);

/// The rows of the cost-growth curves: (label, rows at 0, 1 M and 10 M stored entries).
const GROWTH: [(&str, [&str; 3]); 2] = [
    ("rocksdb", ["rocksdb", "rocksdb-1m", "rocksdb-10m"]),
    (
        "postgres-b1000",
        ["postgres-b1000", "postgres-b1000-1m", "postgres-b1000-10m"],
    ),
];

/// `own_rss`: peak RSS of rows measured in a process of their own, used instead of the row's.
pub(super) fn write(
    path: &std::path::Path,
    rows: &[Row],
    raw_rate: f64,
    own_rss: &std::collections::BTreeMap<String, f64>,
) -> Res<()> {
    let bars_height = 60 + 24 * rows.len() as u32;
    let root = SVGBackend::new(path, (960, bars_height + 340)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (top, bottom) = root.split_vertically(bars_height);
    bars(&top, rows, raw_rate)?;
    let (left, right) = bottom.split_horizontally(480);
    growth(&left, rows, "records per second", |r| r.rate())?;
    growth(&right, rows, "peak RSS (MB)", |r| {
        own_rss.get(&r.name).copied().unwrap_or(r.peak_rss_mb)
    })?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

fn bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    rows: &[Row],
    raw_rate: f64,
) -> Res<()> {
    let n = rows.len() as i32;
    let max = rows.iter().map(Row::rate).fold(1.0, f64::max) * 1.3;
    let mut chart = ChartBuilder::on(area)
        .caption("records per second (ratio to raw)", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(24)
        .y_label_area_size(190)
        .build_cartesian_2d(0f64..max, (0..n - 1).into_segmented())
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(rows.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => rows
                .get((n - 1 - *i) as usize)
                .map_or_else(String::new, |r| r.name.clone()),
            SegmentValue::Last => String::new(),
        })
        .x_label_formatter(&|x| format!("{:.0}k", x / 1000.0))
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, r)| {
            let y = n - 1 - i as i32;
            let color = if r.name.starts_with("raw") {
                GREY
            } else {
                BLUE
            };
            Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(y)),
                    (r.rate(), SegmentValue::Exact(y + 1)),
                ],
                color.filled(),
            )
        }))
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, r)| {
            let y = n - 1 - i as i32;
            Text::new(
                format!(" {:.0} ({:.2})", r.rate(), r.rate() / raw_rate),
                (r.rate(), SegmentValue::CenterOf(y)),
                ("sans-serif", 12),
            )
        }))
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn growth<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    rows: &[Row],
    what: &str,
    value: impl Fn(&Row) -> f64,
) -> Res<()> {
    let series: Vec<(&str, Vec<(f64, f64)>)> = GROWTH
        .iter()
        .map(|(label, names)| {
            let points = names
                .iter()
                .zip([0.0, 1.0, 10.0])
                .filter_map(|(name, millions)| {
                    let row = rows.iter().find(|r| r.name == *name)?;
                    Some((millions, value(row)))
                })
                .collect();
            (*label, points)
        })
        .collect();
    let max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(1.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{what} by stored entries"), ("sans-serif", 14))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..10.5, 0f64..max)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("entries stored before the row (millions)")
        .y_label_formatter(&|y| {
            if *y >= 10_000.0 {
                format!("{:.0}k", y / 1000.0)
            } else {
                format!("{y:.0}")
            }
        })
        .draw()
        .map_err(|e| e.to_string())?;
    for ((label, points), color) in series.into_iter().zip([BLUE, ORANGE]) {
        if points.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}
