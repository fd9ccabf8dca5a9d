//! Sentence embeddings of texts, in pure Rust, for both tiers: a sentence-transformers BERT
//! model (a folder holding `config.json`, `model.safetensors` and `tokenizer.json`) run with
//! candle on the CPU, its last hidden states mean-pooled over the text's tokens and
//! L2-normalised, the text truncated at [`MAX_TOKENS`] tokens and never padded — the recipe
//! that made the evaluation dataset's vectors (`../shared/data/README.md`).
//!
//! This crate is apart from `tiervec-shared` because it reads files and because candle's
//! matrix products run on rayon's pool: `RAYON_NUM_THREADS` sets how many threads an embedding
//! uses (all cores when unset; `1` runs each product on the calling thread). The edge and the
//! cloud link it behind their `embed` feature; the WASM guest never does.
//!
//! A model is known by its [`ModelIdentity`] (its folder's name, its dimension and a checksum
//! of its weights and tokenizer), which a collection records so that a text query is embedded
//! by the model its vectors were made with.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
pub use tiervec_shared::ModelIdentity;
use tokenizers::Tokenizer;
use tracing::info;

/// Tokens a text is truncated at (`[CLS]` and `[SEP]` included), as the dataset was made.
pub const MAX_TOKENS: usize = 256;
pub use tiervec_shared::query::MAX_TEXT_CHARS;
/// Texts one call embeds at most.
pub const MAX_BATCH_TEXTS: usize = 256;
/// Texts embedded in one forward pass of [`Embedder::embed_batch`] (padded to the longest,
/// sorted by length so that padding stays small).
const PASS_TEXTS: usize = 32;

/// Why a model could not be opened or a text not embedded.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the model in {dir} cannot be loaded: {reason}")]
    Model { dir: PathBuf, reason: String },
    #[error("the text is empty (only whitespace)")]
    EmptyText,
    #[error("the text has {chars} characters; at most {limit} are embedded (split it)")]
    TextTooLong { chars: usize, limit: usize },
    #[error("{texts} texts in one call; at most {limit} (send them in batches)")]
    TooManyTexts { texts: usize, limit: usize },
    #[error("embedding failed: {0}")]
    Inference(String),
}

impl EmbedError {
    /// Whether the caller's input is at fault (a client error), not the model.
    pub fn is_input(&self) -> bool {
        matches!(
            self,
            EmbedError::EmptyText
                | EmbedError::TextTooLong { .. }
                | EmbedError::TooManyTexts { .. }
        )
    }
}

fn inference(e: impl std::fmt::Display) -> EmbedError {
    EmbedError::Inference(e.to_string())
}

/// A loaded model and its tokenizer; `Sync`, so one serves every request thread.
pub struct Embedder {
    model: BertModel,
    tokenizer: Tokenizer,
    identity: ModelIdentity,
}

impl Embedder {
    /// Loads the model in folder `dir` (weights in f16 or f32; computed in f32).
    pub fn open(dir: &Path) -> Result<Self, EmbedError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| EmbedError::Io { path, source })
        };
        let model_error = |reason: String| EmbedError::Model {
            dir: dir.to_owned(),
            reason,
        };
        let config: Config = serde_json::from_slice(&read("config.json")?)
            .map_err(|e| model_error(format!("config.json: {e}")))?;
        let weights = read("model.safetensors")?;
        let tokenizer_json = read("tokenizer.json")?;
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        hasher.update(&weights);
        hasher.update(&tokenizer_json);
        let checksum = hasher.digest();

        let mut tokenizer = Tokenizer::from_bytes(&tokenizer_json)
            .map_err(|e| model_error(format!("tokenizer.json: {e}")))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| model_error(format!("tokenizer.json: {e}")))?;

        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu)
            .map_err(|e| model_error(format!("model.safetensors: {e}")))?;
        let model = BertModel::load(vb, &config)
            .map_err(|e| model_error(format!("model.safetensors: {e}")))?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".to_owned());
        let identity = ModelIdentity {
            name,
            dim: config.hidden_size as u32,
            checksum,
        };
        info!(model = %identity, dir = %dir.display(), "embedding model loaded");
        Ok(Self {
            model,
            tokenizer,
            identity,
        })
    }

    /// The model's identity.
    pub fn identity(&self) -> &ModelIdentity {
        &self.identity
    }

    /// The embedding of one text: unit length, [`ModelIdentity::dim`] values.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let ids = self.tokens(text)?;
        let mut out = self.forward(&[ids])?;
        Ok(out.pop().expect("one embedding per text"))
    }

    /// The embeddings of `texts`, in order. Texts of similar length share a forward pass
    /// (padded, the padding masked from attention and from the mean), which gives each text
    /// the embedding [`Embedder::embed`] gives it, to float rounding.
    pub fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.len() > MAX_BATCH_TEXTS {
            return Err(EmbedError::TooManyTexts {
                texts: texts.len(),
                limit: MAX_BATCH_TEXTS,
            });
        }
        let tokens = texts
            .iter()
            .map(|t| self.tokens(t))
            .collect::<Result<Vec<_>, _>>()?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| tokens[i].len());
        let mut out = vec![Vec::new(); texts.len()];
        for pass in order.chunks(PASS_TEXTS) {
            let batch: Vec<Vec<u32>> = pass.iter().map(|&i| tokens[i].clone()).collect();
            for (&i, vector) in pass.iter().zip(self.forward(&batch)?) {
                out[i] = vector;
            }
        }
        Ok(out)
    }

    /// The token ids of `text`, checked and truncated.
    fn tokens(&self, text: &str) -> Result<Vec<u32>, EmbedError> {
        // Counting stops just past the limit: a huge text costs no more than a long one.
        let chars = text.chars().take(MAX_TEXT_CHARS + 1).count();
        if chars > MAX_TEXT_CHARS {
            return Err(EmbedError::TextTooLong {
                chars: text.chars().count(),
                limit: MAX_TEXT_CHARS,
            });
        }
        if text.trim().is_empty() {
            return Err(EmbedError::EmptyText);
        }
        let encoding = self.tokenizer.encode(text, true).map_err(inference)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// One forward pass over `batch` (token ids of each text), padded with id 0 to the
    /// longest; returns each text's mean-pooled, normalised embedding.
    fn forward(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let longest = batch.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(batch.len() * longest);
        let mut mask = Vec::with_capacity(batch.len() * longest);
        for text in batch {
            ids.extend_from_slice(text);
            ids.resize(ids.len() + longest - text.len(), 0);
            mask.extend(std::iter::repeat_n(1u32, text.len()));
            mask.resize(mask.len() + longest - text.len(), 0);
        }
        let shape = (batch.len(), longest);
        let device = &Device::Cpu;
        let ids = Tensor::from_vec(ids, shape, device).map_err(inference)?;
        let token_types = ids.zeros_like().map_err(inference)?;
        let padded = batch.iter().any(|t| t.len() < longest);
        let mask = Tensor::from_vec(mask, shape, device).map_err(inference)?;
        let hidden = self
            .model
            .forward(&ids, &token_types, padded.then_some(&mask))
            .map_err(inference)?;
        // Mean over each text's own tokens (the hidden states of padding zeroed), then unit
        // length: the mean's division by the length cancels in the normalisation, so the sum
        // is normalised directly.
        let summed = if padded {
            let weights = mask
                .to_dtype(DType::F32)
                .and_then(|m| m.unsqueeze(2))
                .map_err(inference)?;
            hidden.broadcast_mul(&weights).and_then(|h| h.sum(1))
        } else {
            hidden.sum(1)
        }
        .map_err(inference)?;
        let summed: Vec<Vec<f32>> = summed.to_vec2().map_err(inference)?;
        Ok(summed
            .into_iter()
            .map(|mut v| {
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                if norm > 0.0 {
                    v.iter_mut().for_each(|x| *x /= norm);
                }
                v
            })
            .collect())
    }
}
