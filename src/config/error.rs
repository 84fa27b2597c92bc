//! What a broken config is reported as: the file, the key, what was expected.

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: {}{message}{}", key_prefix(.key), line_suffix(*.line))]
    Invalid {
        file: String,
        /// Dotted path of the offending key, when known.
        key: Option<String>,
        message: String,
        line: Option<usize>,
    },
}

fn key_prefix(key: &Option<String>) -> String {
    key.as_ref()
        .map(|k| format!("key `{k}`: "))
        .unwrap_or_default()
}

fn line_suffix(line: Option<usize>) -> String {
    line.map(|l| format!(" (line {l})")).unwrap_or_default()
}

/// For `#[serde(default = "default_true")]`.
pub(super) fn default_true() -> bool {
    true
}
