//! What a JSON log line is: `{"timestamp":…,"level":…,"message":…,<fields>,
//! "target":…}`, one object per line with the fields flattened in. The
//! `tracing` formatter [`Json`] writes every event so; [`write_info`] writes a
//! request's line the same way without going through `tracing`.

use std::fmt::Write as _;
use std::time::Duration;

/// JSON lines, one object per event with its fields flattened in:
/// `{"timestamp":…,"level":"INFO","message":…,<fields>,"target":…}`, the
/// shape of `tracing-subscriber`'s flattened JSON, written field by field
/// into the line instead of through a map of values (a request's line is on
/// every request's path).
pub struct Json;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for Json
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        with_line(
            meta.level().as_str(),
            meta.target(),
            |fields| event.record(&mut Fields(fields)),
            |line| writer.write_str(line),
        )
    }
}

/// Formats one JSON line, `{"timestamp":…,"level":…,<fields>,"target":…}`,
/// into this thread's line buffer and hands it to `write`.
fn with_line<R>(
    level: &str,
    target: &str,
    fields: impl FnOnce(&mut JsonFields<'_>),
    write: impl FnOnce(&str) -> R,
) -> R {
    use std::cell::RefCell;
    thread_local! {
        /// The line being formatted: appended to directly, then handed to
        /// the writer in one call.
        static LINE: RefCell<String> = const { RefCell::new(String::new()) };
    }
    LINE.with_borrow_mut(|line| {
        line.clear();
        // Room for a request's line: no growing while it is written.
        line.reserve(512);
        line.push_str("{\"timestamp\":\"");
        timestamp(line, std::time::SystemTime::now());
        line.push_str("\",\"level\":\"");
        line.push_str(level);
        line.push('"');
        fields(&mut JsonFields { out: line });
        line.push_str(",\"target\":\"");
        escape(line, target);
        line.push_str("\"}\n");
        let result = write(line);
        // A rare long line does not keep its memory.
        if line.capacity() > 16 * 1024 {
            *line = String::new();
        }
        result
    })
}

/// Where [`write_info`] writes: set once, by `main`, when logs are JSON.
static DIRECT: std::sync::OnceLock<LineWriter> = std::sync::OnceLock::new();

/// Takes a whole line.
type LineWriter = Box<dyn Fn(&[u8]) + Send + Sync>;

/// Lets [`write_info`] write JSON lines straight to `writer`: where the
/// `tracing` subscriber's [`Json`] lines go.
pub fn write_directly(writer: impl Fn(&[u8]) + Send + Sync + 'static) {
    let _ = DIRECT.set(Box::new(writer));
}

/// Writes an INFO line of `target` straight into the sink given to
/// [`write_directly`], in the shape [`Json`] gives a `tracing` event with the
/// same fields, without going through `tracing`'s dispatch and its field
/// visitor: for the one line of every request. `false` when there is no such
/// sink (text logs, or penstock run as a library): the caller logs through
/// `tracing` then. The caller checks that the target is enabled.
pub(crate) fn write_info(
    target: &str,
    message: &str,
    fields: impl FnOnce(&mut JsonFields<'_>),
) -> bool {
    let Some(direct) = DIRECT.get() else {
        return false;
    };
    info_line(target, message, fields, |line| direct(line.as_bytes()));
    true
}

fn info_line<R>(
    target: &str,
    message: &str,
    fields: impl FnOnce(&mut JsonFields<'_>),
    write: impl FnOnce(&str) -> R,
) -> R {
    with_line(
        "INFO",
        target,
        |f| {
            f.plain(crate::field!("message"), message);
            fields(f)
        },
        write,
    )
}

/// The line [`write_info`] would write, for tests to compare with what
/// `tracing` and [`Json`] make of the same event.
#[cfg(test)]
pub(crate) fn info_text(
    target: &str,
    message: &str,
    fields: impl FnOnce(&mut JsonFields<'_>),
) -> String {
    info_line(target, message, fields, str::to_string)
}

/// What `tracing` and [`Json`] write for the events `emit` makes.
#[cfg(test)]
pub(crate) fn traced_text(emit: impl FnOnce()) -> String {
    let seen = Seen::default();
    let writer = seen.clone();
    let subscriber = tracing_subscriber::fmt()
        .event_format(Json)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, emit);
    let bytes = seen.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
    String::from_utf8(bytes).unwrap_or_default()
}

/// A writer whose bytes a test can read.
#[cfg(test)]
#[derive(Clone, Default)]
struct Seen(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl std::io::Write for Seen {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `time` as RFC 3339 in UTC with microseconds, `2026-11-27T20:35:37.123456Z`.
/// The date and time of day are formatted once a second per thread.
fn timestamp(out: &mut String, time: std::time::SystemTime) {
    use std::cell::RefCell;
    thread_local! {
        /// The second last formatted, and its text up to the fraction.
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with_borrow_mut(|(at, text)| {
        if *at != secs {
            let whole = std::time::UNIX_EPOCH + Duration::from_secs(secs);
            text.clear();
            let _ = write!(text, "{}", humantime::format_rfc3339_seconds(whole));
            // "…:SSZ" without its "Z", to take the fraction.
            text.pop();
            text.push('.');
            *at = secs;
        }
        out.push_str(text);
    });
    // Six digits of microseconds (below 1,000,000), then the zone.
    let micros = since.subsec_micros();
    for place in [100_000, 10_000, 1_000, 100, 10, 1] {
        out.push(char::from(b'0' + (micros / place % 10) as u8));
    }
    out.push('Z');
}

/// A field's name. Names are identifiers penstock's code chose: nothing to
/// escape in them.
#[derive(Clone, Copy)]
pub(crate) enum Name<'a> {
    /// As written in the line, `,"name":`, joined when penstock is built
    /// ([`field!`](crate::field)): one copy for a field of every request's line.
    Written(&'static str),
    /// The bare name (a `tracing` field's).
    Bare(&'a str),
}

impl<'a> From<&'a str> for Name<'a> {
    fn from(name: &'a str) -> Self {
        Name::Bare(name)
    }
}

/// A field name as a JSON line writes it, `,"name":`, joined at compile time.
#[macro_export]
macro_rules! field {
    ($name:literal) => {
        $crate::telemetry::logline::Name::Written(concat!(",\"", $name, "\":"))
    };
}

/// Writes fields into a JSON line, each as `,"name":value`.
pub(crate) struct JsonFields<'a> {
    out: &'a mut String,
}

impl JsonFields<'_> {
    fn name<'n>(&mut self, name: impl Into<Name<'n>>) {
        match name.into() {
            Name::Written(written) => self.out.push_str(written),
            Name::Bare(name) => {
                self.out.push_str(",\"");
                self.out.push_str(name);
                self.out.push_str("\":");
            }
        }
    }

    pub(crate) fn str<'n>(&mut self, name: impl Into<Name<'n>>, value: &str) {
        self.name(name);
        self.out.push('"');
        escape(self.out, value);
        self.out.push('"');
    }

    /// Text penstock made itself with nothing to escape in it (an id it
    /// numbered, a method, a route's label), written as it is.
    pub(crate) fn plain<'n>(&mut self, name: impl Into<Name<'n>>, value: &str) {
        debug_assert!(!value.bytes().any(|b| ESCAPED[b as usize]), "{value:?}");
        self.name(name);
        self.out.push('"');
        self.out.push_str(value);
        self.out.push('"');
    }

    pub(crate) fn u64<'n>(&mut self, name: impl Into<Name<'n>>, value: u64) {
        self.name(name);
        self.out.push_str(itoa::Buffer::new().format(value));
    }

    pub(crate) fn i64<'n>(&mut self, name: impl Into<Name<'n>>, value: i64) {
        self.name(name);
        self.out.push_str(itoa::Buffer::new().format(value));
    }

    pub(crate) fn bool<'n>(&mut self, name: impl Into<Name<'n>>, value: bool) {
        self.name(name);
        self.out.push_str(if value { "true" } else { "false" });
    }

    /// JSON has no NaN nor infinities: those are `null`.
    pub(crate) fn f64<'n>(&mut self, name: impl Into<Name<'n>>, value: f64) {
        self.name(name);
        match value.is_finite() {
            // Most requests save nothing: ryu's own text for zero, without ryu.
            true if value == 0.0 && value.is_sign_positive() => self.out.push_str("0.0"),
            true => self.out.push_str(ryu::Buffer::new().format_finite(value)),
            false => self.out.push_str("null"),
        }
    }

    /// An absent value leaves the field out, as `tracing` does with `None`.
    pub(crate) fn opt_str<'n>(&mut self, name: impl Into<Name<'n>>, value: Option<&str>) {
        if let Some(v) = value {
            self.str(name, v);
        }
    }

    pub(crate) fn opt_u64<'n>(&mut self, name: impl Into<Name<'n>>, value: Option<u64>) {
        if let Some(v) = value {
            self.u64(name, v);
        }
    }

    fn debug(&mut self, name: &str, value: &dyn std::fmt::Debug) {
        self.name(name);
        self.out.push('"');
        // Writing into a String cannot fail.
        let _ = write!(Escaping(self.out), "{value:?}");
        self.out.push('"');
    }
}

/// A `tracing` field visitor writing into a [`JsonFields`].
struct Fields<'a, 'b>(&'a mut JsonFields<'b>);

impl tracing::field::Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.str(field.name(), value);
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.u64(field.name(), value);
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.i64(field.name(), value);
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.bool(field.name(), value);
    }

    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.f64(field.name(), value);
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.debug(field.name(), value);
    }
}

/// Bytes a JSON string cannot hold as they are: quote, backslash, controls.
/// The bytes of a multi-byte character (0x80 and up) are never among them,
/// so every cut between plain runs falls between characters.
static ESCAPED: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = true;
        b += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// Whether any of the 8 bytes in `w` is one [`ESCAPED`] holds: a control
/// byte, a quote or a backslash (the classic zero-byte tests, exact for "any").
fn word_needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    below_space | zero(w ^ (ONES * u64::from(b'"'))) | zero(w ^ (ONES * u64::from(b'\\'))) != 0
}

/// Writes `value` with what a JSON string cannot hold as is escaped. Plain
/// text is skipped 8 bytes at a time.
fn escape(out: &mut String, value: &str) {
    let bytes = value.as_bytes();
    // Short text (a method, a status word, an id) is tested a byte at a time.
    if bytes.len() < 16 && !bytes.iter().any(|&b| ESCAPED[b as usize]) {
        out.push_str(value);
        return;
    }
    let mut plain = 0;
    let mut i = 0;
    while i < bytes.len() {
        if let Some(word) = bytes
            .get(i..i + 8)
            .and_then(|w| <[u8; 8]>::try_from(w).ok())
            && !word_needs_escape(u64::from_le_bytes(word))
        {
            i += 8;
            continue;
        }
        let b = bytes[i];
        if ESCAPED[b as usize] {
            out.push_str(&value[plain..i]);
            match b {
                b'"' => out.push_str("\\\""),
                b'\\' => out.push_str("\\\\"),
                b'\n' => out.push_str("\\n"),
                b'\r' => out.push_str("\\r"),
                b'\t' => out.push_str("\\t"),
                b => {
                    let _ = write!(out, "\\u{b:04x}");
                }
            }
            plain = i + 1;
        }
        i += 1;
    }
    out.push_str(&value[plain..]);
}

/// Escapes what is written through it as a JSON string's content.
struct Escaping<'a>(&'a mut String);

impl std::fmt::Write for Escaping<'_> {
    fn write_str(&mut self, value: &str) -> std::fmt::Result {
        escape(self.0, value);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_with_the_fields_flattened_in() {
        let text = traced_text(|| {
            tracing::info!(
                target: "penstock::access",
                text = "a \"quoted\"\n\u{1} line \\ é",
                n = 42u64,
                neg = -3i64,
                ok = true,
                cost = 7.95e-6,
                nan = f64::NAN,
                missing = Option::<u64>::None,
                shown = %"displayed",
                "request"
            );
        });
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["message"], "request");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "penstock::access");
        assert_eq!(v["text"], "a \"quoted\"\n\u{1} line \\ é");
        assert_eq!(v["n"], 42);
        assert_eq!(v["neg"], -3);
        assert_eq!(v["ok"], true);
        assert_eq!(v["cost"], 7.95e-6);
        assert!(v["nan"].is_null());
        assert!(v.get("missing").is_none());
        assert_eq!(v["shown"], "displayed");
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
    }
    #[test]
    fn a_line_written_directly_is_the_line_tracing_writes() {
        let fields = |f: &mut JsonFields<'_>| {
            f.str("text", "a \"quoted\"\n line é");
            f.u64("n", u64::MAX);
            f.i64("neg", -3);
            f.bool("ok", false);
            f.f64("cost", 7.95e-6);
            f.f64("nan", f64::NAN);
            f.opt_str("missing", None);
            f.opt_u64("present", Some(0));
        };
        let direct = info_text("penstock::access", "request", fields);
        let traced = traced_text(|| {
            tracing::info!(
                target: "penstock::access",
                text = "a \"quoted\"\n line é",
                n = u64::MAX,
                neg = -3i64,
                ok = false,
                cost = 7.95e-6,
                nan = f64::NAN,
                missing = Option::<&str>::None,
                present = Some(0u64),
                "request"
            );
        });
        // The same line but for the time it was written.
        let after_time = |l: &str| l.split_once("\",\"level\"").unwrap().1.to_string();
        assert_eq!(after_time(&direct), after_time(&traced));
        assert!(
            direct.ends_with("\"target\":\"penstock::access\"}\n"),
            "{direct}"
        );
    }
    #[test]
    fn timestamps_are_rfc3339_with_microseconds_across_seconds() {
        let base = std::time::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        for offset_us in [0u64, 1, 999_999, 1_000_000, 1_000_001, 86_400_000_000 + 42] {
            let t = base + Duration::from_micros(offset_us);
            let mut ours = String::new();
            timestamp(&mut ours, t);
            assert_eq!(ours, humantime::format_rfc3339_micros(t).to_string());
        }
    }
    proptest::proptest! {
        /// Any text, escaped, reads back as itself in JSON, and a word is
        /// skipped whole only when none of its bytes needs escaping.
        #[test]
        fn escaped_text_reads_back_as_itself(text in "(?s).{0,64}", word in proptest::prelude::any::<[u8; 8]>()) {
            let mut out = String::new();
            escape(&mut out, &text);
            let back: String = serde_json::from_str(&format!("\"{out}\"")).unwrap();
            proptest::prop_assert_eq!(back, text);
            proptest::prop_assert_eq!(
                word_needs_escape(u64::from_le_bytes(word)),
                word.iter().any(|&b| ESCAPED[b as usize])
            );
        }
    }
}
