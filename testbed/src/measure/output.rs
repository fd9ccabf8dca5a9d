//! A run's outputs: its figures as JSON (`--json`) and its section of `docs/benchmarks.md` with
//! the plots beside it (`--docs`), under one rule for every bench and the demo
//! ([`OutputArgs::docs_dir`]).

use std::path::{Path, PathBuf};

use serde::Serialize;

/// The folder whose `benchmarks.md` holds the recorded figures of full runs.
const RECORDED_DOCS: &str = "docs";

/// The output options every bench and the demo take (flattened into their arguments).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct OutputArgs {
    /// A reduced run (about 1,000 queries or requests; each command says what it reduces) for
    /// smoke tests. It never writes the recorded docs/: its section and plots go only to a
    /// folder named by --docs.
    #[arg(long)]
    pub quick: bool,
    /// Write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Update benchmarks.md and the SVGs under this folder.
    #[arg(long)]
    pub docs: Option<PathBuf>,
    /// Record this full run: replace its section of docs/benchmarks.md and its plots.
    #[arg(long)]
    pub record: bool,
}

/// Why a run's output could not be written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("encoding the figures as JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "a --quick run never writes the recorded {RECORDED_DOCS}/: name another folder with --docs"
    )]
    QuickIntoRecordedDocs,
}

impl OutputArgs {
    /// Where this run writes its docs section and plots, if anywhere. The one rule: docs are
    /// written only when asked — `--record` (the recorded `docs/`) or `--docs DIR` — and a
    /// `--quick` run never writes the recorded `docs/` (its reduced figures would replace the
    /// full run's). Checked before a run starts, so a refused folder costs no measurement.
    pub fn docs_dir(&self) -> Result<Option<&Path>, OutputError> {
        match (&self.docs, self.record, self.quick) {
            (Some(dir), _, true) if is_recorded_docs(dir) => {
                Err(OutputError::QuickIntoRecordedDocs)
            }
            (None, true, true) => Err(OutputError::QuickIntoRecordedDocs),
            (Some(dir), _, _) => Ok(Some(dir)),
            (None, true, false) => Ok(Some(Path::new(RECORDED_DOCS))),
            (None, false, _) => Ok(None),
        }
    }

    /// The flag a docs section quotes in the command that made it: ` --quick` for a reduced
    /// run, ` --record` for a full one (which writes docs only when recorded).
    pub fn quick_flag(&self) -> &'static str {
        if self.quick { " --quick" } else { " --record" }
    }

    /// Writes `report` to `--json`, when given, and `section(report, quick_flag)` as the `name`
    /// section of `benchmarks.md` in the docs folder, when this run writes docs.
    pub fn publish<T: Serialize>(
        &self,
        report: &T,
        name: &str,
        section: impl FnOnce(&T, &str) -> String,
    ) -> Result<(), OutputError> {
        self.write_json(report)?;
        if let Some(docs) = self.docs_dir()? {
            update_benchmarks_md(
                &docs.join("benchmarks.md"),
                name,
                &section(report, self.quick_flag()),
            )?;
        }
        Ok(())
    }

    /// Writes `report` to `--json`, when given.
    pub fn write_json<T: Serialize>(&self, report: &T) -> Result<(), OutputError> {
        match &self.json {
            Some(path) => write_json(path, report),
            None => Ok(()),
        }
    }
}

/// Whether `dir` is the recorded `docs/` of the working directory, however it is spelt.
fn is_recorded_docs(dir: &Path) -> bool {
    let absolute = |p: &Path| std::path::absolute(p).ok();
    absolute(dir)
        .zip(absolute(Path::new(RECORDED_DOCS)))
        .is_none_or(|(a, b)| a == b)
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> OutputError + '_ {
    move |source| OutputError::Io {
        path: path.to_owned(),
        source,
    }
}

fn create_parent(path: &Path) -> Result<(), OutputError> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::create_dir_all(dir).map_err(io_error(dir)),
        None => Ok(()),
    }
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), OutputError> {
    create_parent(path)?;
    std::fs::write(path, serde_json::to_vec_pretty(value)?).map_err(io_error(path))
}

/// Replaces the text between `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->` in the
/// `benchmarks.md` at `path` (appending the section if it is not there yet).
pub fn update_benchmarks_md(path: &Path, name: &str, section: &str) -> Result<(), OutputError> {
    let start = format!("<!-- bench:{name}:start -->");
    let end = format!("<!-- bench:{name}:end -->");
    create_parent(path)?;
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let block = format!("{start}\n{section}\n{end}");
    let new = match (old.find(&start), old.find(&end)) {
        (Some(s), Some(e)) if e > s => format!("{}{}{}", &old[..s], block, &old[e + end.len()..]),
        _ => format!("{}\n{}\n", old.trim_end(), block),
    };
    std::fs::write(path, new).map_err(io_error(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn benchmarks_md_sections_are_replaced_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.md");
        update_benchmarks_md(&p, "local", "one").unwrap();
        update_benchmarks_md(&p, "cloud", "two").unwrap();
        update_benchmarks_md(&p, "local", "three").unwrap();
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.contains("three") && s.contains("two") && !s.contains("one"));
    }

    #[test]
    fn docs_are_written_when_asked_and_never_the_recorded_ones_by_a_quick_run() {
        let args = |quick, docs: Option<&str>, record| OutputArgs {
            quick,
            json: None,
            docs: docs.map(PathBuf::from),
            record,
        };
        let dir = |a: &OutputArgs| a.docs_dir().unwrap().map(Path::to_owned);
        assert_eq!(dir(&args(false, None, false)), None, "only when asked");
        assert_eq!(dir(&args(false, None, true)), Some(PathBuf::from("docs")));
        assert_eq!(dir(&args(true, None, false)), None);
        assert_eq!(
            dir(&args(true, Some("target/ci/docs"), false)),
            Some(PathBuf::from("target/ci/docs"))
        );
        assert_eq!(
            dir(&args(false, Some("target/x"), true)),
            Some(PathBuf::from("target/x"))
        );
        assert!(matches!(
            args(true, None, true).docs_dir(),
            Err(OutputError::QuickIntoRecordedDocs)
        ));
        for recorded in ["docs", "./docs", "docs/"] {
            assert!(matches!(
                args(true, Some(recorded), false).docs_dir(),
                Err(OutputError::QuickIntoRecordedDocs)
            ));
        }
    }
}
