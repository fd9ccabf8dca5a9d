//! Reading the evaluation dataset from `TIERVEC_DATA` (default `../shared/data`): vectors,
//! ground truth and texts, each checked for presence, truncation and shape.

use std::fs;
use std::path::{Path, PathBuf};

use thiserror::Error;
use tiervec_shared::vecs::{self, Matrix, VecsError};

/// Where the dataset lives unless `TIERVEC_DATA` says otherwise (relative to the repo root).
pub const DEFAULT_DATA_DIR: &str = "../shared/data";

/// Why the dataset could not be read.
#[derive(Debug, Error)]
pub enum DatasetError {
    #[error(
        "dataset file {path} is missing; set TIERVEC_DATA to the folder holding base.fvecs, queries.fvecs, groundtruth.ivecs, …"
    )]
    Missing { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is malformed: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: VecsError,
    },
    #[error("{path}: {what}")]
    Shape { path: PathBuf, what: String },
}

/// The whole dataset in memory.
#[derive(Debug)]
pub struct Dataset {
    pub dir: PathBuf,
    pub base: Matrix<f32>,
    pub queries: Matrix<f32>,
    /// Exact top-100 base ids per query (row numbers in `base`), nearest first.
    pub groundtruth: Matrix<i32>,
    /// The matching cosine distances, ascending.
    pub groundtruth_distances: Matrix<f32>,
}

/// The data directory: `TIERVEC_DATA`, else [`DEFAULT_DATA_DIR`] relative to the workspace root.
pub fn data_dir() -> PathBuf {
    match std::env::var_os("TIERVEC_DATA") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(DEFAULT_DATA_DIR),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, DatasetError> {
    fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            DatasetError::Missing {
                path: path.to_owned(),
            }
        } else {
            DatasetError::Io {
                path: path.to_owned(),
                source,
            }
        }
    })
}

/// Reads an `.fvecs` file, checking its dimension when `dim` is given.
pub fn read_fvecs(path: &Path, dim: Option<usize>) -> Result<Matrix<f32>, DatasetError> {
    let m = vecs::parse_fvecs(&read(path)?).map_err(|source| DatasetError::Parse {
        path: path.to_owned(),
        source,
    })?;
    check_dim(path, m.dim, dim)?;
    Ok(m)
}

/// Reads an `.ivecs` file, checking its dimension when `dim` is given.
pub fn read_ivecs(path: &Path, dim: Option<usize>) -> Result<Matrix<i32>, DatasetError> {
    let m = vecs::parse_ivecs(&read(path)?).map_err(|source| DatasetError::Parse {
        path: path.to_owned(),
        source,
    })?;
    check_dim(path, m.dim, dim)?;
    Ok(m)
}

fn check_dim(path: &Path, found: usize, want: Option<usize>) -> Result<(), DatasetError> {
    match want {
        Some(want) if want != found => Err(DatasetError::Shape {
            path: path.to_owned(),
            what: format!("rows have dimension {found}, expected {want}"),
        }),
        _ => Ok(()),
    }
}

/// Reads the `text` field of each line of a `.jsonl` file.
pub fn read_texts(path: &Path) -> Result<Vec<String>, DatasetError> {
    let bytes = read(path)?;
    let text = String::from_utf8(bytes).map_err(|e| DatasetError::Shape {
        path: path.to_owned(),
        what: format!("not UTF-8: {e}"),
    })?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            #[derive(serde::Deserialize)]
            struct Line {
                text: String,
            }
            serde_json::from_str::<Line>(line)
                .map(|l| l.text)
                .map_err(|e| DatasetError::Shape {
                    path: path.to_owned(),
                    what: format!("line {}: {e}", i + 1),
                })
        })
        .collect()
}

impl Dataset {
    /// Query `q`'s shipped exact top-`k` (`k` ≤ 100): ids and distances, nearest first.
    pub fn ground_truth(&self, q: usize, k: usize) -> (Vec<u64>, Vec<f32>) {
        (
            self.groundtruth.row(q)[..k]
                .iter()
                .map(|&i| i as u64)
                .collect(),
            self.groundtruth_distances.row(q)[..k].to_vec(),
        )
    }

    /// Loads every vector file of the dataset in `dir` and checks that they fit together.
    pub fn load(dir: &Path) -> Result<Dataset, DatasetError> {
        let base = read_fvecs(&dir.join("base.fvecs"), None)?;
        let queries = read_fvecs(&dir.join("queries.fvecs"), Some(base.dim))?;
        let gt_path = dir.join("groundtruth.ivecs");
        let groundtruth = read_ivecs(&gt_path, None)?;
        let gtd_path = dir.join("groundtruth_distances.fvecs");
        let groundtruth_distances = read_fvecs(&gtd_path, Some(groundtruth.dim))?;
        for (path, rows) in [
            (&gt_path, groundtruth.rows()),
            (&gtd_path, groundtruth_distances.rows()),
        ] {
            if rows != queries.rows() {
                return Err(DatasetError::Shape {
                    path: path.clone(),
                    what: format!("{rows} rows for {} queries", queries.rows()),
                });
            }
        }
        if let Some(bad) = groundtruth
            .data
            .iter()
            .find(|&&id| id < 0 || id as usize >= base.rows())
        {
            return Err(DatasetError::Shape {
                path: gt_path,
                what: format!("id {bad} is not a row of base.fvecs"),
            });
        }
        Ok(Dataset {
            dir: dir.to_owned(),
            base,
            queries,
            groundtruth,
            groundtruth_distances,
        })
    }

    /// Loads from [`data_dir`].
    pub fn load_default() -> Result<Dataset, DatasetError> {
        Self::load(&data_dir())
    }

    /// The base texts, one per base vector.
    pub fn base_texts(&self) -> Result<Vec<String>, DatasetError> {
        let path = self.dir.join("base.jsonl");
        let texts = read_texts(&path)?;
        if texts.len() != self.base.rows() {
            return Err(DatasetError::Shape {
                path,
                what: format!(
                    "{} lines for {} base vectors",
                    texts.len(),
                    self.base.rows()
                ),
            });
        }
        Ok(texts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_truncated_and_missized_files_have_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.fvecs");
        assert!(matches!(
            read_fvecs(&p, None),
            Err(DatasetError::Missing { .. })
        ));
        let good = vecs::encode_fvecs(4, &[0.5; 8]);
        fs::write(&p, &good[..good.len() - 3]).unwrap();
        assert!(matches!(
            read_fvecs(&p, None),
            Err(DatasetError::Parse {
                source: VecsError::Truncated { .. },
                ..
            })
        ));
        fs::write(&p, &good).unwrap();
        assert_eq!(read_fvecs(&p, Some(4)).unwrap().rows(), 2);
        assert!(matches!(
            read_fvecs(&p, Some(384)),
            Err(DatasetError::Shape { .. })
        ));
        let j = dir.path().join("t.jsonl");
        fs::write(&j, "{\"id\":0,\"text\":\"a\"}\nnot json\n").unwrap();
        assert!(matches!(read_texts(&j), Err(DatasetError::Shape { .. })));
    }
}
