//! Benchmarks: each writes the figures of `../shared/docs/bench-json.md` as JSON, a table into
//! `docs/benchmarks.md` and, where it plots, an SVG beside it (`crate::measure::OutputArgs`).
//! Here: the rows of the in-process benches, measured one engine at a time or interleaved, and
//! their tables.

pub mod cloud;
pub mod cluster;
pub mod e2e;
pub mod embed;
pub mod faults;
pub mod gpu;
pub mod load;
pub mod local;
pub mod memory;
pub mod soak;
pub mod wasm;

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::measure::{Latencies, recall_at_10};
use crate::plot::Series;

/// One engine at one setting.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub engine: &'static str,
    pub ef: Option<usize>,
    pub recall_at_10: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub qps: f64,
    pub threads: usize,
}

/// The best row of an engine that reaches a recall target.
#[derive(Debug, Clone, Serialize)]
pub struct AtRecall {
    pub engine: &'static str,
    pub ef: Option<usize>,
    pub recall_at_10: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Runs `search` over the queries `passes` times on this thread, recording each call's latency;
/// recall comes from the first pass.
pub fn measure(
    engine: &'static str,
    ef: Option<usize>,
    queries: &[&[f32]],
    truth: &[(Vec<u64>, Vec<f32>)],
    samples: usize,
    search: impl FnMut(&[f32], &mut Vec<(u64, f32)>),
) -> Row {
    let mut contender = [Contender {
        engine,
        ef,
        search: Box::new(search),
    }];
    let mut rows = measure_interleaved(&mut contender, queries, truth, samples, queries.len());
    rows.remove(0)
}

/// One search as a measurement calls it: the query, and where to put `(id, distance)` hits.
pub type SearchFn<'a> = Box<dyn FnMut(&[f32], &mut Vec<(u64, f32)>) + 'a>;

/// An engine measured beside others by [`measure_interleaved`].
pub struct Contender<'a> {
    pub engine: &'static str,
    pub ef: Option<usize>,
    pub search: SearchFn<'a>,
}

/// The order in which `engines` engines take block number `turn` of [`measure_interleaved`]:
/// reversed every other block and, with more than two engines, rotated every second one, so
/// over `2 · engines` blocks each engine runs in every place equally often (two engines simply
/// alternate: A B, B A, A B, …).
fn block_order(turn: usize, engines: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..engines).collect();
    if engines > 2 {
        order.rotate_left((turn / 2) % engines);
    }
    if turn % 2 == 1 {
        order.reverse();
    }
    order
}

/// [`measure`] for engines compared in one run, interleaved: the queries go in blocks of
/// `block`, each block to every engine in turn, the order reversed from one block to the next
/// and, with more than two engines, rotated every second block (so each takes every place).
/// A shared machine's speed drifts during a run (other tenants, clock changes); measured one
/// after the other, engines see different machines and their ratio moves by ±15 % from run to
/// run here, interleaved they see the same one. Blocks rather than single queries so that each
/// engine still runs with its own data warm in the caches, as it would serving alone.
pub fn measure_interleaved(
    contenders: &mut [Contender<'_>],
    queries: &[&[f32]],
    truth: &[(Vec<u64>, Vec<f32>)],
    samples: usize,
    block: usize,
) -> Vec<Row> {
    let passes = samples.div_ceil(queries.len()).max(1);
    let mut lat: Vec<Latencies> = contenders.iter().map(|_| Latencies::new()).collect();
    let mut recall = vec![0.0; contenders.len()];
    let mut busy = vec![Duration::ZERO; contenders.len()];
    let mut found = Vec::with_capacity(16);
    let mut turn = 0usize;
    let pairs: Vec<_> = queries.iter().zip(truth).collect();
    for pass in 0..passes {
        for chunk in pairs.chunks(block.max(1)) {
            let order = block_order(turn, contenders.len());
            turn += 1;
            for c in order {
                let contender = &mut contenders[c];
                for (q, (ids, dists)) in chunk {
                    let t = Instant::now();
                    (contender.search)(q, &mut found);
                    let d = t.elapsed();
                    busy[c] += d;
                    lat[c].record(d);
                    if pass == 0 {
                        recall[c] += recall_at_10(&found, ids, dists);
                    }
                }
            }
        }
    }
    let mut rows = Vec::new();
    for (c, contender) in contenders.iter().enumerate() {
        let row = Row {
            engine: contender.engine,
            ef: contender.ef,
            recall_at_10: recall[c] / queries.len() as f64,
            p50_us: lat[c].percentile_us(0.50),
            p99_us: lat[c].percentile_us(0.99),
            p999_us: lat[c].percentile_us(0.999),
            qps: lat[c].samples() as f64 / busy[c].as_secs_f64(),
            threads: 1,
        };
        eprintln!(
            "  {:<11} ef={:<4} recall@10={:.4} p50={:>8.1}µs p99={:>8.1}µs p99.9={:>8.1}µs qps={:>9.0}",
            row.engine,
            row.ef.map_or("-".into(), |e| e.to_string()),
            row.recall_at_10,
            row.p50_us,
            row.p99_us,
            row.p999_us,
            row.qps
        );
        rows.push(row);
    }
    rows
}

/// Best (lowest p50) row of `engine` with recall ≥ `target`.
pub fn best_at(rows: &[Row], engine: &str, target: f64) -> Option<AtRecall> {
    rows.iter()
        .filter(|r| r.engine == engine && r.recall_at_10 >= target)
        .min_by(|a, b| a.p50_us.total_cmp(&b.p50_us))
        .map(|r| AtRecall {
            engine: r.engine,
            ef: r.ef,
            recall_at_10: r.recall_at_10,
            p50_us: r.p50_us,
            p99_us: r.p99_us,
        })
}

/// The recall–latency line of each engine in `rows` (`plot::recall_latency`): `(recall@10,
/// p50 µs)` points in recall order, tiervec first and the others by name.
pub fn recall_latency_series(rows: &[Row]) -> Vec<Series<'static>> {
    let mut engines: Vec<&'static str> = rows.iter().map(|r| r.engine).collect();
    engines.sort_by_key(|e| (*e != "tiervec", *e));
    engines.dedup();
    engines
        .into_iter()
        .map(|engine| {
            let mut points: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.engine == engine)
                .map(|r| (r.recall_at_10, r.p50_us))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            (engine, points)
        })
        .collect()
}

/// The markdown table of `rows`, with a column of concurrent clients when `with_clients`.
pub fn rows_table(rows: &[Row], with_clients: bool) -> String {
    let mut md = String::from(if with_clients {
        "| engine | ef | clients | recall@10 | p50 µs | p99 µs | p99.9 µs | QPS |\n|---|---:|---:|---:|---:|---:|---:|---:|\n"
    } else {
        "| engine | ef | recall@10 | p50 µs | p99 µs | p99.9 µs | QPS |\n|---|---:|---:|---:|---:|---:|---:|\n"
    });
    for row in rows {
        let clients = if with_clients {
            format!(" {} |", row.threads)
        } else {
            String::new()
        };
        md.push_str(&format!(
            "| {} | {} |{clients} {:.4} | {:.1} | {:.1} | {:.1} | {:.0} |\n",
            row.engine,
            row.ef.map_or("-".into(), |e| e.to_string()),
            row.recall_at_10,
            row.p50_us,
            row.p99_us,
            row.p999_us,
            row.qps
        ));
    }
    md
}

/// The list of each engine's best row at recall@10 ≥ 0.98.
pub fn best_rows_list(best: &[AtRecall]) -> String {
    best.iter()
        .map(|a| {
            format!(
                "- {}: ef={} recall {:.4}, p50 {:.1} µs, p99 {:.1} µs\n",
                a.engine,
                a.ef.map_or("-".into(), |e| e.to_string()),
                a.recall_at_10,
                a.p50_us,
                a.p99_us
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_blocks_give_every_engine_every_place() {
        assert_eq!(block_order(0, 2), [0, 1]);
        assert_eq!(block_order(1, 2), [1, 0]);
        assert_eq!(block_order(2, 2), [0, 1]);
        assert_eq!(block_order(3, 2), [1, 0]);
        for engines in 1..=4 {
            let mut seen = vec![vec![0; engines]; engines];
            for turn in 0..2 * engines {
                for (place, engine) in block_order(turn, engines).into_iter().enumerate() {
                    seen[engine][place] += 1;
                }
            }
            for row in &seen {
                assert!(
                    row.iter().all(|&n| n == row[0]),
                    "{engines} engines: {seen:?}"
                );
            }
        }
        assert!(block_order(0, 0).is_empty());
    }
}
