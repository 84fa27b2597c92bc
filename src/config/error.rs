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

/// How a part's `validate` reports a broken key: its whole name (`state.lease`)
/// and what was expected.
pub type Bad<'a> = &'a dyn Fn(&str, String) -> ConfigError;

pub(super) const MINUTE: u64 = 60;
pub(super) const HOUR: u64 = 3600;

/// Each duration above zero where asked (`nonzero`), and at most its bound in
/// seconds: a typo of a unit ("600h") must not turn a bound off.
pub(super) fn durations(
    bad: Bad,
    list: &[(&str, std::time::Duration, bool, u64)],
) -> Result<(), ConfigError> {
    for &(key, d, nonzero, max_secs) in list {
        if nonzero && d.is_zero() {
            return Err(bad(
                key,
                "expected a duration above zero, like \"30s\"".into(),
            ));
        }
        let max = std::time::Duration::from_secs(max_secs);
        if d > max {
            return Err(bad(
                key,
                format!("expected at most {}", humantime::format_duration(max)),
            ));
        }
    }
    Ok(())
}
