//! Configuration in layers (feature `config`, for the edge and cloud binaries): a struct's
//! defaults, then a TOML file, then environment variables, then flags — each later layer wins —
//! merged by figment and read into the plain struct.

use std::path::Path;

use figment::providers::{Data, Env, Format, Serialized, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider};
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
/// then each `field=value` of `overrides` (`--set`; `table.field` for nested keys). A variable's
/// or a flag's value is an array, an inline table or a quoted string in TOML syntax when it
/// starts like one (`[`, `{`, `"`, `'`), and otherwise the text it spells, which becomes a
/// number or a boolean only where the field is one: a password `123456` stays a string, and
/// `1e12` is a number for a number field. A field `T` does not have is an error in any layer.
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
    for (key, value) in Env::prefixed(env_prefix).split("__").iter() {
        let name = format!(
            "environment variable {env_prefix}{}",
            key.as_str().to_ascii_uppercase().replace('.', "__")
        );
        let layer = assignment(key.as_str(), &value, name).map_err(LayerError)?;
        figment = figment.merge(layer);
    }
    for o in overrides {
        let (field, value) = o
            .split_once('=')
            .ok_or_else(|| LayerError(format!("--set {o}: expected field=value")))?;
        let layer =
            assignment(field.trim(), value, format!("flag --set {o}")).map_err(LayerError)?;
        figment = figment.merge(layer);
    }
    // Lossy: a field that is a number or a boolean takes the text of one.
    figment
        .extract_lossy()
        .map_err(|e| LayerError(format!("configuration: {e}")))
}

/// `field = value` as a TOML layer named `name` (errors say which variable or flag a key came
/// from): `value` as TOML where it starts as an array, an inline table or a quoted string, else
/// as the string it is.
fn assignment(field: &str, value: &str, name: String) -> Result<Assignment, String> {
    if field.is_empty() || field.split('.').any(str::is_empty) {
        return Err(format!("{name}: empty field name"));
    }
    let value = value.trim();
    let text = if value.starts_with(['[', '{', '"', '\'']) {
        format!("{field} = {value}")
    } else {
        format!(
            "{field} = {}",
            serde_json::to_string(value).expect("a string serialises")
        )
    };
    let toml = Toml::string(&text);
    toml.data().map_err(|e| format!("{name}: {e}"))?;
    Ok(Assignment { toml, name })
}

/// One variable's or flag's layer, named for error messages.
struct Assignment {
    toml: Data<Toml>,
    name: String,
}

impl Provider for Assignment {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        self.toml.data()
    }
}
