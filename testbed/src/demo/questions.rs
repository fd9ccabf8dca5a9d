//! Three real questions asked of an edge as text, as its users would ask them, with the texts
//! it answered and where each answer came from: the demo's deployment seen from outside.

use std::collections::HashMap;

use anyhow::Context;
use serde::Serialize;
use serde_json::{Value, json};

use crate::trace::Request;

/// How many hits each question shows.
const HITS: usize = 3;

/// One question and the edge's answer.
#[derive(Debug, Clone, Serialize)]
pub struct Asked {
    pub question: String,
    /// How often the edge's trace asked it (its popularity there).
    pub asked_in_trace: usize,
    /// `local`, `cloud` or `degraded`.
    pub source: String,
    pub certified: bool,
    pub took_us: u64,
    pub embed_us: Option<u64>,
    /// The answered texts with their distances, nearest first.
    pub answers: Vec<(f32, String)>,
}

/// Asks `search_url` (an edge taking texts) three questions of the dataset's query texts: the
/// one `requests` (that edge's trace) asked most, one it asked once, and one it never asked.
pub async fn ask_three(
    http: &reqwest::Client,
    search_url: &str,
    requests: &[Request],
    query_texts: &[String],
) -> anyhow::Result<Vec<Asked>> {
    let mut counts: HashMap<usize, usize> = HashMap::new();
    for r in requests {
        *counts.entry(r.query).or_default() += 1;
    }
    let most = counts
        .iter()
        .max_by_key(|&(q, n)| (*n, std::cmp::Reverse(*q)))
        .map(|(q, _)| *q)
        .context("an empty trace")?;
    let once = (0..query_texts.len()).find(|q| counts.get(q) == Some(&1));
    let never = (0..query_texts.len()).find(|q| !counts.contains_key(q));
    let mut asked = Vec::new();
    for q in [Some(most), once, never].into_iter().flatten() {
        let answer: Value = http
            .post(search_url)
            .json(&json!({"text": query_texts[q], "k": HITS, "with_payload": true}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let answers = answer["hits"]
            .as_array()
            .context("an answer without hits")?
            .iter()
            .map(|h| {
                (
                    h["distance"].as_f64().unwrap_or(f64::NAN) as f32,
                    h["payload"]["text"]
                        .as_str()
                        .unwrap_or("(no text)")
                        .to_owned(),
                )
            })
            .collect();
        asked.push(Asked {
            question: query_texts[q].clone(),
            asked_in_trace: counts.get(&q).copied().unwrap_or(0),
            source: answer["source"].as_str().unwrap_or("?").to_owned(),
            certified: answer["certified"].as_bool().unwrap_or(false),
            took_us: answer["took_us"].as_u64().unwrap_or(0),
            embed_us: answer["embed_us"].as_u64(),
            answers,
        });
    }
    Ok(asked)
}

/// The questions as the demo prints them.
pub fn render(edge: &str, asked: &[Asked]) -> String {
    let mut out = format!("Three questions asked of {edge} as text (top {HITS}):\n");
    for a in asked {
        out.push_str(&format!(
            "  \"{}\" (asked {} times in the trace) → {}{}, {:.1} ms ({:.1} ms embedding)\n",
            a.question,
            a.asked_in_trace,
            a.source,
            if a.certified { ", certified exact" } else { "" },
            a.took_us as f64 / 1e3,
            a.embed_us.unwrap_or(0) as f64 / 1e3,
        ));
        for (distance, text) in &a.answers {
            out.push_str(&format!("      {distance:.3}  {text}\n"));
        }
    }
    out
}
