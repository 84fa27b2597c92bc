//! Where log lines go: into memory first, written to stderr by a thread of
//! their own every [`EVERY`], many lines per `write`. A request's line then
//! costs its formatting and a copy on the worker, no system call and no
//! wake-up of another thread. Nothing is dropped: past [`MOST`] waiting
//! bytes (stderr blocked or slow), the thread that logs writes them itself,
//! so logging slows down rather than losing lines or growing without bound.
//! A line reaches stderr at most [`EVERY`] after it was logged, and on exit
//! when the [`Flushed`] guard is dropped.

use std::fmt::Write as _;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often waiting lines are written.
pub const EVERY: Duration = Duration::from_millis(20);

/// Waiting bytes beyond which the logging thread writes them itself.
pub const MOST: usize = 1 << 20;

struct Shared<W> {
    waiting: Mutex<Vec<u8>>,
    /// Serialises the writes, so lines keep their order.
    out: Mutex<W>,
}

impl<W: Write> Shared<W> {
    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes what is waiting.
    fn flush(&self) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let lines = std::mem::take(&mut *self.lock_waiting());
        if !lines.is_empty() {
            // Nowhere to report a failing stderr: the lines are gone either way.
            let _ = out.write_all(&lines);
            let _ = out.flush();
        }
    }
}

/// A [`tracing_subscriber::fmt::MakeWriter`] that gathers lines.
pub struct Sink<W> {
    shared: Arc<Shared<W>>,
}

impl<W> Clone for Sink<W> {
    fn clone(&self) -> Self {
        Sink {
            shared: self.shared.clone(),
        }
    }
}

impl<W: Write> Write for Sink<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let full = {
            let mut waiting = self.shared.lock_waiting();
            waiting.extend_from_slice(buf);
            waiting.len() > MOST
        };
        if full {
            self.shared.flush();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a, W: Write + 'a> tracing_subscriber::fmt::MakeWriter<'a> for Sink<W> {
    type Writer = Sink<W>;
    fn make_writer(&'a self) -> Sink<W> {
        self.clone()
    }
}

/// Writes what is left when dropped; stops the writing thread.
pub struct Flushed {
    flush: Box<dyn Fn() + Send>,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Flushed {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (self.flush)();
    }
}

/// A sink writing to `out`, and its guard.
pub fn sink<W: Write + Send + 'static>(out: W) -> (Sink<W>, Flushed) {
    let shared = Arc::new(Shared {
        waiting: Mutex::new(Vec::with_capacity(64 * 1024)),
        out: Mutex::new(out),
    });
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let writer = shared.clone();
    let thread = std::thread::Builder::new()
        .name("penstock-log".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(EVERY)
            {
                writer.flush();
            }
        })
        .ok();
    let last = shared.clone();
    (
        Sink { shared },
        Flushed {
            flush: Box::new(move || last.flush()),
            stop: Some(stop),
            thread,
        },
    )
}

/// A sink writing to stderr.
pub fn stderr() -> (Sink<std::io::Stderr>, Flushed) {
    sink(std::io::stderr())
}

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
        use std::cell::RefCell;
        thread_local! {
            /// The line being formatted: appended to directly, then handed to
            /// the subscriber's writer in one call.
            static LINE: RefCell<String> = const { RefCell::new(String::new()) };
        }
        let meta = event.metadata();
        LINE.with_borrow_mut(|line| {
            line.clear();
            line.push_str("{\"timestamp\":\"");
            timestamp(line, std::time::SystemTime::now());
            line.push_str("\",\"level\":\"");
            line.push_str(meta.level().as_str());
            line.push('"');
            event.record(&mut Fields { out: line });
            line.push_str(",\"target\":\"");
            escape(line, meta.target());
            line.push_str("\"}\n");
            let result = writer.write_str(line);
            // A rare long line does not keep its memory.
            if line.capacity() > 16 * 1024 {
                *line = String::new();
            }
            result
        })
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
    let mut digits = [b'0'; 6];
    let mut n = since.subsec_micros();
    for d in digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.push_str(std::str::from_utf8(&digits).unwrap_or("000000"));
    out.push('Z');
}

/// A field visitor that writes each field as `,"name":value`.
struct Fields<'a> {
    out: &'a mut String,
}

impl Fields<'_> {
    fn field(&mut self, field: &tracing::field::Field, value: impl FnOnce(&mut String)) {
        // A field's name is an identifier penstock's code chose: nothing to escape.
        self.out.push_str(",\"");
        self.out.push_str(field.name());
        self.out.push_str("\":");
        value(self.out);
    }
}

impl tracing::field::Visit for Fields<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.field(field, |out| {
            out.push('"');
            escape(out, value);
            out.push('"');
        });
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.field(field, |out| out.push_str(itoa::Buffer::new().format(value)));
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.field(field, |out| out.push_str(itoa::Buffer::new().format(value)));
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.field(field, |out| {
            out.push_str(if value { "true" } else { "false" })
        });
    }

    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        // JSON has no NaN nor infinities.
        match value.is_finite() {
            true => self.field(field, |out| {
                out.push_str(ryu::Buffer::new().format_finite(value))
            }),
            false => self.field(field, |out| out.push_str("null")),
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.field(field, |out| {
            out.push('"');
            // Writing into a String cannot fail.
            let _ = write!(Escaping(out), "{value:?}");
            out.push('"');
        });
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

    /// A writer whose bytes the test can read.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<u8>>>);

    impl Write for Seen {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_arrives_in_order_and_the_guard_writes_the_rest() {
        let seen = Seen::default();
        let (sink, guard) = sink(seen.clone());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut sink = sink.clone();
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        sink.write_all(format!("{t} {i}\n").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let text = String::from_utf8(seen.0.lock().unwrap().clone()).unwrap();
        let mut next = [0usize; 4];
        for line in text.lines() {
            let (t, i) = line.split_once(' ').unwrap();
            let t: usize = t.parse().unwrap();
            assert_eq!(i.parse::<usize>().unwrap(), next[t], "line {line}");
            next[t] += 1;
        }
        assert_eq!(next, [5000; 4], "no line lost");
    }

    #[test]
    fn lines_are_json_with_the_fields_flattened_in() {
        use tracing_subscriber::fmt::MakeWriter as _;
        let seen = Seen::default();
        let (sink, guard) = sink(seen.clone());
        let subscriber = tracing_subscriber::fmt()
            .event_format(Json)
            .with_writer(move || sink.make_writer())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
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
        drop(guard);
        let text = String::from_utf8(seen.0.lock().unwrap().clone()).unwrap();
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

    #[test]
    fn past_the_bound_the_logging_thread_writes_itself() {
        let seen = Seen::default();
        let (mut sink, _guard) = sink(seen.clone());
        sink.write_all(&vec![b'x'; MOST + 1]).unwrap();
        // Written before the call returned, not by the writing thread later.
        assert_eq!(seen.0.lock().unwrap().len(), MOST + 1);
    }
}
