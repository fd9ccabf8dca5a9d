//! Bulk loads of a user's own data (`tiervec-cloud load`): records from a JSON-lines file (each
//! an id, its fields kept as the point's payload, and a text to embed), vectors from an
//! `.fvecs` or `.npy` file or from the texts, and the progress file that lets an interrupted
//! load go on where it stopped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use tiervec_shared::vecs::{Matrix, parse_fvecs};

/// Why a load could not read its input.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {why}")]
    Line {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error("{path}: {why}")]
    Vectors { path: PathBuf, why: String },
    #[error("progress file {path}: {why}")]
    Progress { path: PathBuf, why: String },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> LoadError + '_ {
    move |source| LoadError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One line of a JSON-lines file.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub id: u64,
    /// The line's object, as JSON: the point's payload.
    pub payload: String,
    /// Its text field, when it has one.
    pub text: Option<String>,
}

/// Reads the records of `path`: each line a JSON object whose `id_field` (a whole number) is
/// the point's id — or, in a file where no line has that field, the line's number from 0 —
/// whose `text_field` (a string) is its text, and which is kept whole as its payload. Blank
/// lines are skipped; an id given twice is refused (the second would silently replace the
/// first).
pub fn read_jsonl(path: &Path, id_field: &str, text_field: &str) -> Result<Vec<Record>, LoadError> {
    let file = std::fs::File::open(path).map_err(io_error(path))?;
    let line_error = |line: usize, why: String| LoadError::Line {
        path: path.to_owned(),
        line,
        why,
    };
    let mut records = Vec::new();
    let mut with_ids = None;
    let mut seen = std::collections::HashSet::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io_error(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| line_error(i + 1, e.to_string()))?;
        let object = value
            .as_object()
            .ok_or_else(|| line_error(i + 1, "not a JSON object".into()))?;
        let id = match (object.get(id_field), with_ids) {
            (Some(id), None | Some(true)) => {
                with_ids = Some(true);
                id.as_u64().ok_or_else(|| {
                    line_error(i + 1, format!("`{id_field}` is {id}, not a whole number"))
                })?
            }
            (None, None | Some(false)) => {
                with_ids = Some(false);
                records.len() as u64
            }
            (Some(_), Some(false)) | (None, Some(true)) => {
                return Err(line_error(
                    i + 1,
                    format!(
                        "some lines have `{id_field}` and some do not: give every line one, or none"
                    ),
                ));
            }
        };
        if !seen.insert(id) {
            return Err(line_error(i + 1, format!("id {id} was given before")));
        }
        let text = match object.get(text_field) {
            None => None,
            Some(serde_json::Value::String(t)) => Some(t.clone()),
            Some(other) => {
                return Err(line_error(
                    i + 1,
                    format!("`{text_field}` is {other}, not a string"),
                ));
            }
        };
        records.push(Record {
            id,
            payload: line,
            text,
        });
    }
    Ok(records)
}

/// The vectors of an `.fvecs` file, or of an `.npy` file holding a 2-D float32 array in C
/// order, by the file's extension.
pub fn read_vectors(path: &Path) -> Result<Matrix<f32>, LoadError> {
    let vectors_error = |why: String| LoadError::Vectors {
        path: path.to_owned(),
        why,
    };
    let bytes = std::fs::read(path).map_err(io_error(path))?;
    match path.extension().and_then(|e| e.to_str()) {
        Some("fvecs") => parse_fvecs(&bytes).map_err(|e| vectors_error(e.to_string())),
        Some("npy") => {
            let npy = npyz::NpyFile::new(&bytes[..]).map_err(|e| vectors_error(e.to_string()))?;
            let (rows, dim) = match *npy.shape() {
                [rows, dim] => (rows as usize, dim as usize),
                ref other => {
                    return Err(vectors_error(format!(
                        "an array of shape {other:?}; a 2-D (rows, dimension) array is loaded"
                    )));
                }
            };
            if npy.order() != npyz::Order::C {
                return Err(vectors_error(
                    "a Fortran-order array; save it in C order".into(),
                ));
            }
            let data: Vec<f32> = npy.into_vec().map_err(|e| {
                vectors_error(format!(
                    "{e} (the array must be float32: `a.astype('float32')`)"
                ))
            })?;
            if data.len() != rows * dim || dim == 0 {
                return Err(vectors_error(format!(
                    "{} values for shape ({rows}, {dim})",
                    data.len()
                )));
            }
            Ok(Matrix { dim, data })
        }
        _ => Err(vectors_error(
            "vectors are read from `.fvecs` or `.npy` files".into(),
        )),
    }
}

/// How far a load of one input into one collection got: the collection's identity and the
/// records acknowledged durable, in a small file `<collection>.<input's file name>.loaded` in
/// folder `dir` (the loader's `.tiervec-load/`: inputs often sit in read-only folders),
/// replaced atomically after each batch. A collection of another identity (dropped and made
/// again, or a fresh data directory) starts from the first record. Upserts are idempotent, so
/// resending the batch in flight at an interruption is harmless.
pub struct Progress {
    path: PathBuf,
}

impl Progress {
    pub fn new(dir: &Path, input: &Path, collection: &str) -> Progress {
        let mut name = std::ffi::OsString::from(format!("{collection}."));
        name.push(input.file_name().unwrap_or_default());
        name.push(".loaded");
        Progress {
            path: dir.join(name),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records earlier runs loaded into the collection of identity `collection` (0 when none
    /// did).
    pub fn done(&self, collection: &str) -> Result<usize, LoadError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_error(&self.path)(e)),
        };
        match text.split_whitespace().collect::<Vec<_>>()[..] {
            [id, count] => match count.parse() {
                Ok(count) if id == collection => Ok(count),
                Ok(_) => Ok(0),
                Err(_) => Err(self.damaged(&text)),
            },
            _ => Err(self.damaged(&text)),
        }
    }

    fn damaged(&self, text: &str) -> LoadError {
        LoadError::Progress {
            path: self.path.clone(),
            why: format!(
                "`{}` is not a collection identity and a count of records; delete the file to load from the start",
                text.trim()
            ),
        }
    }

    /// Notes that the first `done` records are durable in the collection of identity
    /// `collection`.
    pub fn record(&self, collection: &str, done: usize) -> Result<(), LoadError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        }
        tiervec_shared::durable::write_atomic(
            &self.path,
            format!("{collection} {done}\n").as_bytes(),
            false,
        )
        .map_err(io_error(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_records_keep_ids_fields_and_texts_and_refuse_what_is_ambiguous() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docs.jsonl");
        std::fs::write(
            &path,
            "{\"id\": 7, \"text\": \"a dog\", \"lang\": \"en\"}\n\n{\"id\": 9, \"text\": \"a cat\"}\n",
        )
        .unwrap();
        let records = read_jsonl(&path, "id", "text").unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(
            (records[0].id, records[0].text.as_deref()),
            (7, Some("a dog"))
        );
        let payload: serde_json::Value = serde_json::from_str(&records[0].payload).unwrap();
        assert_eq!(payload["lang"], "en");
        // No ids at all: line numbers.
        std::fs::write(&path, "{\"text\": \"a\"}\n{\"text\": \"b\"}\n").unwrap();
        let ids: Vec<u64> = read_jsonl(&path, "id", "text")
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, vec![0, 1]);
        for (bad, line) in [
            ("{\"id\": 1}\n{\"text\": \"b\"}\n", 2),
            ("{\"id\": 1}\n{\"id\": 1}\n", 2),
            ("{\"id\": -1}\n", 1),
            ("{\"id\": 1, \"text\": 5}\n", 1),
            ("[1]\n", 1),
            ("{\"id\": 1\n", 1),
        ] {
            std::fs::write(&path, bad).unwrap();
            match read_jsonl(&path, "id", "text") {
                Err(LoadError::Line { line: l, .. }) => assert_eq!(l, line, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn npy_files_of_float32_rows_are_read_and_others_refused() {
        use npyz::WriterBuilder;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.npy");
        let write = |shape: &[u64], data: &[f32]| {
            let mut out = Vec::new();
            let mut w = npyz::WriteOptions::<f32>::new()
                .default_dtype()
                .shape(shape)
                .writer(&mut out)
                .begin_nd()
                .unwrap();
            w.extend(data.iter().copied()).unwrap();
            w.finish().unwrap();
            std::fs::write(&path, out).unwrap();
        };
        write(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let m = read_vectors(&path).unwrap();
        assert_eq!((m.dim, m.data.len()), (3, 6));
        assert_eq!(m.row(1), &[4.0, 5.0, 6.0]);
        write(&[6], &[1.0; 6]);
        assert!(matches!(
            read_vectors(&path),
            Err(LoadError::Vectors { .. })
        ));
        std::fs::write(&path, b"not numpy").unwrap();
        assert!(matches!(
            read_vectors(&path),
            Err(LoadError::Vectors { .. })
        ));
        assert!(matches!(
            read_vectors(&dir.path().join("v.csv")),
            Err(LoadError::Io { .. })
        ));
    }

    #[test]
    fn progress_is_kept_beside_the_input() {
        let dir = tempfile::tempdir().unwrap();
        let progress = Progress::new(
            &dir.path().join("state"),
            Path::new("in/docs.jsonl"),
            "notes",
        );
        assert_eq!(
            progress.path(),
            dir.path().join("state/notes.docs.jsonl.loaded")
        );
        assert_eq!(progress.done("a").unwrap(), 0);
        progress.record("a", 1_000).unwrap();
        assert_eq!(progress.done("a").unwrap(), 1_000);
        // Another incarnation of the collection starts over.
        assert_eq!(progress.done("b").unwrap(), 0);
        std::fs::write(progress.path(), "x").unwrap();
        assert!(progress.done("a").is_err());
    }
}
