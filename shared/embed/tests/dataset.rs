//! The embedder against the dataset it must reproduce: the shipped model embeds the first
//! 1,000 base texts to the shipped vectors (cosine ≥ 0.999 each), one at a time and batched;
//! and its limits hold at limit + 1.

use std::io::{BufRead, Read};

use tiervec_embed::{EmbedError, Embedder, MAX_BATCH_TEXTS, MAX_TEXT_CHARS};
use tiervec_test_support::paths::{data_dir, model_dir};

const TEXTS: usize = 1_000;

fn embedder() -> Embedder {
    Embedder::open(&model_dir()).expect("the model opens (set TIERVEC_MODEL)")
}

/// The first `n` base texts and their vectors.
fn base(n: usize) -> (Vec<String>, Vec<Vec<f32>>) {
    let texts = std::io::BufReader::new(
        std::fs::File::open(data_dir().join("base.jsonl")).expect("base.jsonl (set TIERVEC_DATA)"),
    )
    .lines()
    .take(n)
    .map(|line| {
        let record: serde_json::Value = serde_json::from_str(&line.expect("a line")).expect("json");
        record["text"].as_str().expect("a text").to_owned()
    })
    .collect();
    let mut file = std::fs::File::open(data_dir().join("base.fvecs")).expect("base.fvecs");
    let mut vectors = Vec::with_capacity(n);
    for _ in 0..n {
        let mut row = vec![0u8; 4 + 4 * 384];
        file.read_exact(&mut row).expect("a row");
        assert_eq!(u32::from_le_bytes(row[..4].try_into().unwrap()), 384);
        vectors.push(
            row[4..]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        );
    }
    (texts, vectors)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn the_first_thousand_base_texts_embed_to_the_shipped_vectors() {
    let embedder = embedder();
    assert_eq!(embedder.identity().dim, 384);
    assert_eq!(embedder.identity().name, "all-MiniLM-L6-v2");
    let (texts, vectors) = base(TEXTS);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let mut worst = f64::MAX;
    for chunk in (0..TEXTS).collect::<Vec<_>>().chunks(MAX_BATCH_TEXTS) {
        let batch: Vec<&str> = chunk.iter().map(|&i| refs[i]).collect();
        for (&i, got) in chunk
            .iter()
            .zip(embedder.embed_batch(&batch).expect("embeds"))
        {
            let c = cosine(&got, &vectors[i]);
            assert!(
                c >= 0.999,
                "base text {i}: cosine {c} to the shipped vector"
            );
            worst = worst.min(c);
        }
    }
    // One at a time (no padding at all) agrees too, and with the batched embedding.
    for i in (0..TEXTS).step_by(50) {
        let one = embedder.embed(refs[i]).expect("embeds");
        assert!(cosine(&one, &vectors[i]) >= 0.999, "base text {i} alone");
        let norm: f32 = one.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "unit length, got {norm}");
    }
    println!("lowest cosine over {TEXTS} base texts: {worst:.6}");
}

#[test]
fn limits_hold_at_limit_plus_one() {
    let embedder = embedder();
    // Multi-byte characters count once each.
    let at_limit = "é".repeat(MAX_TEXT_CHARS);
    assert_eq!(at_limit.chars().count(), MAX_TEXT_CHARS);
    assert_eq!(embedder.embed(&at_limit).expect("embeds").len(), 384);
    let over = "x".repeat(MAX_TEXT_CHARS + 1);
    assert!(matches!(
        embedder.embed(&over),
        Err(EmbedError::TextTooLong { chars, limit }) if chars == MAX_TEXT_CHARS + 1 && limit == MAX_TEXT_CHARS
    ));
    assert!(matches!(
        embedder.embed(" \n\t"),
        Err(EmbedError::EmptyText)
    ));
    let many = vec!["a dog"; MAX_BATCH_TEXTS + 1];
    let err = embedder.embed_batch(&many).unwrap_err();
    assert!(matches!(err, EmbedError::TooManyTexts { texts, .. } if texts == MAX_BATCH_TEXTS + 1));
    assert!(err.is_input());
    assert_eq!(
        embedder
            .embed_batch(&many[..MAX_BATCH_TEXTS])
            .expect("embeds")
            .len(),
        MAX_BATCH_TEXTS
    );
}

#[test]
fn a_missing_or_damaged_model_is_named() {
    let dir = std::env::temp_dir().join(format!("tiervec-embed-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    assert!(matches!(Embedder::open(&dir), Err(EmbedError::Io { .. })));
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(model_dir().join(name), dir.join(name)).unwrap();
    }
    std::fs::write(dir.join("model.safetensors"), b"not safetensors").unwrap();
    let err = Embedder::open(&dir).err().expect("damaged weights refused");
    assert!(matches!(err, EmbedError::Model { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
