//! Configuration in layers (feature `config`, for the edge and cloud binaries): a struct's
//! defaults, then a TOML file, then environment variables, then flags — each later layer wins —
//! merged by figment and read into the plain struct.

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::Value;
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

/// Why a configuration could not be read; the message names the key and the layer it came from
/// (the file, the environment variable, the flag).
#[derive(Debug, Error)]
#[error("{0}")]
pub struct LayerError(String);

/// Reads `T`: its defaults, then `file` (TOML, which must exist when given), then the
/// environment variables `<env_prefix><FIELD>` (`__` between nested keys, e.g.
/// `TIERVEC_CLOUD_HTTP__MAX_CONNECTIONS`; a `.` works too where the environment allows one),
/// then each `field=value` of `overrides` (`--set`; `table.field` for nested keys). Values of
/// variables and flags are read as TOML values where they parse as one (numbers, booleans,
/// arrays, inline tables), as strings otherwise. A field `T` does not have is an error in any
/// layer.
pub fn load<T: Serialize + DeserializeOwned + Default>(
    file: Option<&Path>,
    env_prefix: &str,
    overrides: &[String],
) -> Result<T, LayerError> {
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        if !path.is_file() {
            return Err(LayerError(format!(
                "cannot read config {}: not a file",
                path.display()
            )));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = figment.merge(Env::prefixed(env_prefix).split("__"));
    for o in overrides {
        let (field, value) = o
            .split_once('=')
            .ok_or_else(|| LayerError(format!("--set {o}: expected field=value")))?;
        let field = field.trim();
        if field.is_empty() || field.split('.').any(str::is_empty) {
            return Err(LayerError(format!("--set {o}: empty field name")));
        }
        let value: Value = value.trim().parse().unwrap_or_else(|e| match e {});
        figment = figment.merge(Serialized::default(field, value));
    }
    figment
        .extract()
        .map_err(|e| LayerError(format!("configuration: {e}")))
}
