//! [`EdgeIndex`]: an open snapshot and the edge's search API over it.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use thiserror::Error;
use tiervec_shared::hnsw::{Neighbour, SearchScratch};
use tiervec_shared::query::{QueryError, validate_search};
use tiervec_shared::snapshot::{Expected, Snapshot, SnapshotError, SnapshotHeader, SnapshotView};
use tracing::{debug_span, info};

use crate::files::SnapshotBytes;

/// Errors of the edge cache.
#[derive(Debug, Error)]
pub enum EdgeError {
    #[error("cannot read snapshot {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot {path} refused: {source}")]
    Snapshot {
        path: PathBuf,
        #[source]
        source: SnapshotError,
    },
    #[error("invalid search request: {0}")]
    Query(#[from] QueryError),
    /// The WASM guest refused the request as invalid (its message).
    #[error("invalid search request: {0}")]
    GuestQuery(String),
    /// The cloud's answer with its payloads would not fit in a frame (its message says how
    /// large): ask for fewer hits or without payloads.
    #[error("answer too large: {0}")]
    AnswerTooLarge(String),
}

/// One search result: the cloud id, its distance (see `tiervec_shared::metric`), the LSN of
/// its last write and, when the snapshot carries payloads, its payload (borrowed from a version
/// 2 snapshot, converted from a version 1 file's text).
#[derive(Clone, Debug, PartialEq)]
pub struct Hit<'a> {
    pub id: u64,
    pub distance: f32,
    pub lsn: u64,
    /// The payload as a JSON text.
    pub payload: Option<Cow<'a, str>>,
}

/// Reusable buffers for one search at a time: the graph search's marks and heaps, and room for
/// the query prepared for the metric. Sized by the first search, then reused.
#[derive(Debug, Default)]
pub struct Searcher {
    scratch: SearchScratch,
    query: Vec<f32>,
}

impl Searcher {
    pub fn new() -> Self {
        Self::default()
    }
}

/// A validated, searchable snapshot.
pub struct EdgeIndex {
    snapshot: Snapshot<SnapshotBytes>,
    path: PathBuf,
    searchers: Mutex<Vec<Searcher>>,
}

impl EdgeIndex {
    /// Memory-maps and validates the snapshot at `path` (see `files` for the mmap hazard).
    pub fn open(path: &Path) -> Result<EdgeIndex, EdgeError> {
        let bytes = SnapshotBytes::map(path).map_err(|source| EdgeError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_bytes(bytes, path)
    }

    /// [`EdgeIndex::open`], then checks the snapshot against what the caller's configuration
    /// says the collection is (dimension, metric, identity).
    pub fn open_expecting(path: &Path, expected: &Expected) -> Result<EdgeIndex, EdgeError> {
        let index = Self::open(path)?;
        expected
            .check(index.header())
            .map_err(|source| EdgeError::Snapshot {
                path: path.to_owned(),
                source,
            })?;
        Ok(index)
    }

    /// Reads the snapshot at `path` into anonymous memory and validates it.
    pub fn load(path: &Path) -> Result<EdgeIndex, EdgeError> {
        let bytes = SnapshotBytes::read(path).map_err(|source| EdgeError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_bytes(bytes, path)
    }

    /// Validates `bytes` (named `path` in messages).
    pub fn from_bytes(bytes: SnapshotBytes, path: &Path) -> Result<EdgeIndex, EdgeError> {
        let _span = debug_span!("snapshot_open", path = %path.display()).entered();
        let snapshot = Snapshot::open(bytes).map_err(|source| EdgeError::Snapshot {
            path: path.to_owned(),
            source,
        })?;
        let h = snapshot.header();
        info!(
            path = %path.display(),
            vectors = h.count,
            dim = h.spec.dim,
            metric = %h.spec.metric,
            bytes = snapshot.byte_len(),
            "snapshot opened"
        );
        Ok(EdgeIndex {
            snapshot,
            path: path.to_owned(),
            searchers: Mutex::new(Vec::new()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &SnapshotHeader {
        self.snapshot.header()
    }

    /// The snapshot file's validated bytes.
    pub fn bytes(&self) -> &[u8] {
        self.snapshot.bytes()
    }

    /// In-place access to the archived contents.
    pub fn view(&self) -> SnapshotView<'_> {
        self.snapshot.view()
    }

    pub fn len(&self) -> usize {
        self.snapshot.header().count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `k` nearest vectors to `query` with beam width `ef` (raised to `k` if smaller).
    /// Rejects a wrong dimension, NaN or infinite components, `k == 0`, `k > MAX_K` and
    /// `ef > MAX_EF` with [`EdgeError::Query`].
    pub fn search(&self, query: &[f32], k: usize, ef: usize) -> Result<Vec<Hit<'_>>, EdgeError> {
        let mut searcher = self
            .searchers
            .lock()
            .map(|mut pool| pool.pop())
            .unwrap_or_default()
            .unwrap_or_default();
        let mut hits = Vec::with_capacity(k);
        let result = self.search_with(&mut searcher, query, k, ef, &mut hits);
        if let Ok(mut pool) = self.searchers.lock() {
            pool.push(searcher);
        }
        result.map(|()| hits)
    }

    /// [`EdgeIndex::search`] with caller-owned buffers: once `searcher` and `hits` have been
    /// used for one search, further searches allocate nothing.
    pub fn search_with<'a>(
        &'a self,
        searcher: &mut Searcher,
        query: &[f32],
        k: usize,
        ef: usize,
        hits: &mut Vec<Hit<'a>>,
    ) -> Result<(), EdgeError> {
        let view = self.snapshot.view();
        let _span = debug_span!("edge_search", k, ef).entered();
        validate_search(query, view.dim(), k, ef)?;
        searcher.query.clear();
        searcher.query.extend_from_slice(query);
        view.metric().prepare(&mut searcher.query);
        let found = view.search(&searcher.query, k, ef, &mut searcher.scratch);
        hits.clear();
        hits.extend(found.iter().map(|&Neighbour { id, distance }| Hit {
            id: view.ids()[id as usize],
            distance,
            lsn: view.lsn(id).unwrap_or(0),
            payload: view.payload(id),
        }));
        Ok(())
    }
}
