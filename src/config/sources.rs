//! Where a configuration comes from: the TOML file, `ECHOD_*` variables and command-line
//! overrides, layered in that order over the defaults, with every loader error reworded
//! to name its file or variable and key.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::{Config, TlsMaterial, WebConfig};

/// Where the configuration comes from; kept so a reload reads the same sources again.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// The TOML file, if any; without one the embedded defaults apply.
    pub file: Option<PathBuf>,
    /// `key = value` overrides from the command line, applied last.
    pub overrides: Vec<(String, String)>,
}

/// A configuration that cannot be used, with enough context to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file named by the operator.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema.
    #[error("invalid config file {path}: {message}")]
    File {
        /// The file named by the operator.
        path: PathBuf,
        /// The parser's message, with line, column and key.
        message: String,
    },
    /// An `ECHOD_*` variable whose name is not a configuration key.
    #[error("invalid environment variable `{name}`: {message}")]
    Variable {
        /// The variable's name.
        name: String,
        /// What is wrong with it.
        message: String,
    },
    /// An `ECHOD_*` variable or CLI override does not fit the schema.
    #[error("invalid configuration from environment (ECHOD_*) or command line: {0}")]
    Layer(String),
    /// A value is well-typed but out of range or inconsistent.
    #[error("invalid configuration ({origin}): key `{key}`: {message}")]
    Value {
        /// Where the value came from: the environment variable, the command line, the
        /// file, or the defaults.
        origin: String,
        /// The dotted key.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

/// The key naming the exporter web configuration file.
const WEB_CONFIG_KEY: &str = "metrics.web_config_file";

impl ConfigSource {
    /// Reads every layer and validates the result.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        self.load_with_env(&env)
    }

    /// Like [`ConfigSource::load`], with the environment passed in (for tests).
    pub fn load_with_env(&self, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let mut config = self.load_settings(env)?;
        if let Some(path) = &config.metrics.web_config_file {
            let web = WebConfig::load(path).map_err(|e| ConfigError::Value {
                origin: self.origin_of(WEB_CONFIG_KEY, env),
                key: WEB_CONFIG_KEY.to_string(),
                message: format!("web config file {}: {e}", path.display()),
            })?;
            config.metrics.web_config = Some(Arc::new(web));
        }
        if !config.tls.listen.is_empty() {
            let material = TlsMaterial::load(&config.tls).map_err(|(key, message)| {
                // A file no layer names is asked for by tls.listen: where that was set.
                let unset = match key {
                    "tls.cert_file" => config.tls.cert_file.is_none(),
                    "tls.key_file" => config.tls.key_file.is_none(),
                    _ => false,
                };
                ConfigError::Value {
                    origin: self.origin_of(if unset { "tls.listen" } else { key }, env),
                    key: key.to_string(),
                    message,
                }
            })?;
            config.tls.loaded = Some(Arc::new(material));
        }
        Ok(config)
    }

    /// Every layer merged and validated, without reading the files the settings name.
    fn load_settings(&self, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        check_variable_names(env)?;
        let mut builder = config::Config::builder();
        let mut file_text = None;
        if let Some(path) = &self.file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            // The toml crate points at the exact line, column and key; the config crate
            // would not name the file.
            let file_error = |message: String| ConfigError::File {
                path: path.clone(),
                message,
            };
            toml::from_str::<Config>(&text).map_err(|e| {
                let message = plain(e.to_string().trim_end());
                // A value the schema refuses (a bad CIDR in a list, say) is named by its
                // dotted key, not only by its line: `allow` is in three sections.
                file_error(match e.span().and_then(|span| key_at(&text, span)) {
                    Some(key) => format!("key `{key}`: {message}"),
                    None => message,
                })
            })?;
            check_integers(&text).map_err(file_error)?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
            file_text = Some(text);
        }
        builder = builder.add_source(environment_layer(env));
        // `ECHOD_UDP__LISTEN=` means "no addresses" (the list parser would read one
        // empty address instead). Only for a listener: an empty variable elsewhere is
        // not configuration, or `${UNSET}` in a compose file would quietly empty an
        // access list or the reflection ports.
        for key in LIST_KEYS.iter().filter(|key| key.ends_with(".listen")) {
            let var = format!("ECHOD_{}", key.to_uppercase().replace('.', "__"));
            if env.get(&var).is_some_and(|v| v.trim().is_empty()) {
                builder = builder
                    .set_override(key, Vec::<String>::new())
                    .map_err(|e| ConfigError::Layer(plain(&e.to_string())))?;
            }
        }
        for (key, value) in &self.overrides {
            builder = builder
                .set_override(key.as_str(), value.as_str())
                .map_err(|e| ConfigError::Layer(plain(&e.to_string())))?;
        }
        let merged = builder
            .build()
            .and_then(config::Config::try_deserialize::<Config>);
        let config = match (merged, &self.file, &file_text) {
            (Ok(config), _, _) => config,
            // The file passed the checks above but not the loader: still the file's
            // fault when the loader refuses it alone, so name the file, not the
            // environment.
            (Err(e), Some(path), Some(text)) if file_alone_fails(text) => {
                return Err(ConfigError::File {
                    path: path.clone(),
                    message: plain(&e.to_string()),
                });
            }
            (Err(e), _, _) => return Err(ConfigError::Layer(plain(&e.to_string()))),
        };
        config
            .validate()
            .map_err(|(key, message)| ConfigError::Value {
                origin: self.origin_of(key, env),
                key: key.to_string(),
                message,
            })?;
        Ok(config)
    }

    /// Where the value of dotted `key` came from, highest layer first.
    fn origin_of(&self, key: &str, env: &HashMap<String, String>) -> String {
        if self.overrides.iter().any(|(k, _)| k == key) {
            return "command line".to_string();
        }
        let wanted = format!("ECHOD_{}", key.replace('.', "__"));
        if let Some(name) = env.keys().find(|name| name.eq_ignore_ascii_case(&wanted)) {
            return format!("environment variable {name}");
        }
        match &self.file {
            Some(path) => path.display().to_string(),
            None => "defaults".to_string(),
        }
    }
}

/// The loader reads `ECHOD_A__B[3]` as element 3 of `a.b`, growing the list to that
/// index (`[99999999999]` asks for terabytes and aborts the process), and `.` as a key
/// separator. Configuration variables are names only: letters, digits and `_`.
fn check_variable_names(env: &HashMap<String, String>) -> Result<(), ConfigError> {
    let bad = env
        .keys()
        .filter(|name| is_config_variable(name))
        .find(|name| !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    let Some(name) = bad else {
        return Ok(());
    };
    // The key the variable was meant for: its name up to the first stray character.
    let key = name["ECHOD_".len()..]
        .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase()
        .replace("__", ".");
    Err(ConfigError::Variable {
        name: name.clone(),
        message: format!(
            "key `{key}`: configuration variables are named ECHOD_SECTION__KEY with \
             letters, digits and `_` only; list elements cannot be set one by one by index \
             (set the whole list, comma-separated)"
        ),
    })
}

/// `ECHOD_SECTION__KEY` variables configure echod; single-segment ones such as
/// `ECHOD_CONFIG` or Kubernetes' injected `ECHOD_SERVICE_HOST` do not.
fn is_config_variable(name: &str) -> bool {
    name.starts_with("ECHOD_") && name.contains("__")
}

/// The loader reads every TOML integer as an i64, while the schema check above reads an
/// unsigned field as a u64: a value between the two passes one and fails the other
/// with no key named. Finds such a value and names its key and line.
fn check_integers(text: &str) -> Result<(), String> {
    // Syntax errors were reported by the schema check, with more detail.
    let Ok(doc) = toml::de::DeTable::parse(text) else {
        return Ok(());
    };
    let mut key = String::new();
    for (name, value) in doc.get_ref() {
        key.clear();
        key.push_str(name.get_ref());
        check_integer(value, &mut key, text)?;
    }
    Ok(())
}

fn check_integer(
    value: &toml::Spanned<toml::de::DeValue<'_>>,
    key: &mut String,
    text: &str,
) -> Result<(), String> {
    let len = key.len();
    let result = match value.get_ref() {
        toml::de::DeValue::Integer(n) if i64::from_str_radix(n.as_str(), n.radix()).is_err() => {
            let line = text
                .get(..value.span().start)
                .map_or(0, |before| before.matches('\n').count() + 1);
            Err(format!(
                "key `{key}` (line {line}): integer is larger than {}, the most a \
                 configuration value can be",
                i64::MAX
            ))
        }
        toml::de::DeValue::Table(table) => table.iter().try_for_each(|(name, value)| {
            key.truncate(len);
            key.push('.');
            key.push_str(name.get_ref());
            check_integer(value, key, text)
        }),
        toml::de::DeValue::Array(items) => items.iter().enumerate().try_for_each(|(i, value)| {
            key.truncate(len);
            key.push_str(&format!("[{i}]"));
            check_integer(value, key, text)
        }),
        _ => Ok(()),
    };
    key.truncate(len);
    result
}

/// The dotted key of the value (not a table) whose text holds `span`, if any.
fn key_at(text: &str, span: std::ops::Range<usize>) -> Option<String> {
    fn find(
        name: &str,
        value: &toml::Spanned<toml::de::DeValue<'_>>,
        span: &std::ops::Range<usize>,
    ) -> Option<String> {
        match value.get_ref() {
            toml::de::DeValue::Table(table) => table
                .iter()
                .find_map(|(key, value)| find(key.get_ref(), value, span))
                .map(|key| format!("{name}.{key}")),
            _ => {
                let at = value.span();
                (at.start <= span.start && span.end <= at.end).then(|| name.to_string())
            }
        }
    }
    let doc = toml::de::DeTable::parse(text).ok()?;
    doc.get_ref()
        .iter()
        .find_map(|(name, value)| find(name.get_ref(), value, &span))
}

/// True when the loader refuses the file's text on its own.
fn file_alone_fails(text: &str) -> bool {
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .and_then(config::Config::try_deserialize::<Config>)
        .is_err()
}

/// Says a parser's message in an operator's words: the TOML and config crates speak of
/// Rust types (`expected usize`, `enum LogFormat does not have variant constructor`),
/// which mean nothing to someone editing a config file.
fn plain(message: &str) -> String {
    let mut text = message.to_string();
    for rust_type in [
        "usize",
        "u64",
        "u32",
        "u16",
        "u8",
        "i64",
        "i32",
        "an integer",
    ] {
        text = text.replace(&format!("expected {rust_type}"), "expected a whole number");
    }
    text = text
        .replace("invalid type: ", "got ")
        .replace("unknown variant", "unknown value")
        .replace(
            "invalid socket address syntax",
            "expected IP:PORT with a numeric address (IPv4, or IPv6 in brackets) and a port \
             from 0 to 65535; host names are not resolved",
        );
    const CONSTRUCTOR: &str = " does not have variant constructor ";
    if let (Some(start), Some(at)) = (text.find("enum "), text.find(CONSTRUCTOR)) {
        let value_start = at + CONSTRUCTOR.len();
        let value_end = text[value_start..]
            .find(char::is_whitespace)
            .map_or(text.len(), |i| value_start + i);
        let value = text[value_start..value_end].to_string();
        text.replace_range(start..value_end, &format!("unknown value `{value}`"));
    }
    text
}

/// Keys whose environment values are comma-separated lists.
const LIST_KEYS: [&str; 12] = [
    "tcp.listen",
    "tcp.allow",
    "tcp.deny",
    "udp.allow",
    "udp.deny",
    "metrics.allow",
    "metrics.deny",
    "tls.listen",
    "tcp.proxy_protocol.trusted_sources",
    "udp.listen",
    "metrics.listen",
    "udp.deny_source_ports",
];

/// Only `ECHOD_SECTION__KEY` variables are configuration ([`is_config_variable`]); the
/// others must not trip unknown-key detection.
fn environment_layer(env: &HashMap<String, String>) -> config::Environment {
    let filtered: config::Map<String, String> = env
        .iter()
        .filter(|(k, v)| is_config_variable(k) && !v.trim().is_empty())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    LIST_KEYS.iter().fold(
        config::Environment::with_prefix("ECHOD")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .source(Some(filtered)),
        |env, key| env.with_list_parse_key(key),
    )
}
