//! Text in place of vectors: the embedding model this node runs (`model_dir` in the
//! configuration; cargo feature `embed`, on by default), and the rule that a text is embedded
//! only by the model its collection records (name, dimension and checksum of its files).

use std::path::Path;
use std::time::Duration;

use tiervec_shared::ModelIdentity;

/// Why a text could not be embedded for a collection.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error(
        "this cloud runs no embedding model: start it with `model_dir` (a sentence-transformers model folder), or send vectors"
    )]
    NoModel,
    #[error(
        "collection `{collection}` records no embedding model: create it with `model` to search it by text, or send vectors"
    )]
    CollectionHasNoModel { collection: String },
    #[error(
        "collection `{collection}` was made with model {recorded}; this cloud runs {running}: texts would be embedded into another space"
    )]
    ModelMismatch {
        collection: String,
        recorded: ModelIdentity,
        running: ModelIdentity,
    },
    #[error("model `{asked}` is not the one this cloud runs ({running})")]
    UnknownModel {
        asked: String,
        running: ModelIdentity,
    },
    #[error("{0}")]
    Input(String),
    #[error("the embedding model failed: {0}")]
    Failed(String),
    #[error("cannot load the embedding model: {0}")]
    Load(String),
}

impl TextError {
    /// Whether the request is at fault (a client error), not this node.
    pub fn is_client_error(&self) -> bool {
        !matches!(self, TextError::Failed(_) | TextError::Load(_))
    }
}

/// The embedding model of this node, if it runs one.
#[derive(Default)]
pub struct Texts {
    #[cfg(feature = "embed")]
    embedder: Option<tiervec_embed::Embedder>,
}

impl Texts {
    /// Loads the model in `model_dir`; none without a folder.
    pub fn open(model_dir: Option<&Path>) -> Result<Texts, TextError> {
        match model_dir {
            None => Ok(Texts::default()),
            #[cfg(feature = "embed")]
            Some(dir) => Ok(Texts {
                embedder: Some(
                    tiervec_embed::Embedder::open(dir)
                        .map_err(|e| TextError::Load(e.to_string()))?,
                ),
            }),
            #[cfg(not(feature = "embed"))]
            Some(dir) => Err(TextError::Load(format!(
                "{} is configured, but this build has no embedder (cargo feature `embed`)",
                dir.display()
            ))),
        }
    }

    /// The model this node runs.
    pub fn identity(&self) -> Option<&ModelIdentity> {
        #[cfg(feature = "embed")]
        {
            self.embedder.as_ref().map(|e| e.identity())
        }
        #[cfg(not(feature = "embed"))]
        {
            None
        }
    }

    /// The model a collection may be created with when a client names `asked`: the one this
    /// node runs, under that name.
    pub fn model_named(&self, asked: &str) -> Result<ModelIdentity, TextError> {
        let running = self.identity().ok_or(TextError::NoModel)?;
        if running.name != asked {
            return Err(TextError::UnknownModel {
                asked: asked.to_owned(),
                running: running.clone(),
            });
        }
        Ok(running.clone())
    }

    /// Embeds `texts` for collection `collection`, which records `recorded`; returns the
    /// vectors and the time spent embedding.
    pub fn embed(
        &self,
        collection: &str,
        recorded: Option<&ModelIdentity>,
        texts: &[&str],
    ) -> Result<(Vec<Vec<f32>>, Duration), TextError> {
        let running = self.identity().ok_or(TextError::NoModel)?;
        let recorded = recorded.ok_or_else(|| TextError::CollectionHasNoModel {
            collection: collection.to_owned(),
        })?;
        if recorded != running {
            return Err(TextError::ModelMismatch {
                collection: collection.to_owned(),
                recorded: recorded.clone(),
                running: running.clone(),
            });
        }
        self.embed_unchecked(texts)
    }

    #[cfg(feature = "embed")]
    fn embed_unchecked(&self, texts: &[&str]) -> Result<(Vec<Vec<f32>>, Duration), TextError> {
        let embedder = self.embedder.as_ref().ok_or(TextError::NoModel)?;
        let started = std::time::Instant::now();
        let vectors = match texts {
            [one] => embedder.embed(one).map(|v| vec![v]),
            many => embedder.embed_batch(many),
        }
        .map_err(|e| {
            if e.is_input() {
                TextError::Input(e.to_string())
            } else {
                TextError::Failed(e.to_string())
            }
        })?;
        Ok((vectors, started.elapsed()))
    }

    #[cfg(not(feature = "embed"))]
    fn embed_unchecked(&self, _: &[&str]) -> Result<(Vec<Vec<f32>>, Duration), TextError> {
        Err(TextError::NoModel)
    }
}
