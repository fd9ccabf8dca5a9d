//! Configuration in layers (feature `config`, for the edge and cloud binaries): a struct's
//! defaults, then a TOML file, then environment variables, then flags — each later layer wins —
//! merged by figment and read into the plain struct.

use std::path::Path;

use figment::Figment;
use figment::Provider;
use figment::providers::{Env, Format, Serialized, Toml};
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
/// then each `field=value` of `overrides` (`--set`; `table.field` for nested keys). A flag's
/// value is a TOML value where it parses as one, a string otherwise; a variable's is read by
/// figment's own rules (numbers, booleans, arrays and inline tables, else a string; exponents
/// such as `1e12` are strings there: write them out, or use a flag). A field `T` does not have
/// is an error in any layer.
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
        // A TOML assignment, so values read as in the file (`1e12`, inline tables with quoted
        // keys); a value that is not TOML is the string it spells.
        let value = value.trim();
        let assignment = format!("{field} = {value}");
        let layer = if Toml::string(&assignment).data().is_ok() {
            Toml::string(&assignment)
        } else {
            let quoted = serde_json::to_string(value).expect("a string serialises");
            Toml::string(&format!("{field} = {quoted}"))
        };
        if let Err(e) = layer.data() {
            return Err(LayerError(format!("--set {o}: {e}")));
        }
        figment = figment.merge(layer);
    }
    figment
        .extract()
        .map_err(|e| LayerError(format!("configuration: {e}")))
}
