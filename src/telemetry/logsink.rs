//! Where log lines go: into memory first, written to stderr by a thread of
//! their own every [`EVERY`], many lines per `write`. A request's line then
//! costs its formatting and a copy on the worker, no system call and no
//! wake-up of another thread. Each thread that logs gathers its lines apart,
//! so threads logging at once neither take turns at one lock nor pass its
//! memory between cores. Nothing is dropped: past [`MOST`] waiting bytes
//! (stderr blocked or slow), the thread that logs writes its own itself, so
//! logging slows down rather than losing lines or growing without bound. A
//! line reaches stderr at most [`EVERY`] after it was logged, and on exit when
//! the [`Flushed`] guard is dropped. One thread's lines keep their order;
//! lines of different threads logged within [`EVERY`] of each other may not.

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use thread_local::ThreadLocal;

/// How often waiting lines are written.
pub(crate) const EVERY: Duration = Duration::from_millis(20);

/// A thread's waiting bytes beyond which it writes them itself.
pub(crate) const MOST: usize = 1 << 20;

struct Shared<W> {
    /// Each logging thread's waiting lines.
    waiting: ThreadLocal<Mutex<Vec<u8>>>,
    /// Serialises the writes, so one thread's lines keep their order.
    out: Mutex<W>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<W: Write> Shared<W> {
    /// Writes what every thread has waiting.
    fn flush(&self) {
        let mut out = lock(&self.out);
        for waiting in self.waiting.iter() {
            Self::write(&mut out, waiting);
        }
        // Nowhere to report a failing stderr: the lines are gone either way.
        let _ = out.flush();
    }

    /// Writes one thread's waiting lines; the thread keeps a buffer as large.
    fn write(out: &mut W, waiting: &Mutex<Vec<u8>>) {
        let lines = {
            let mut waiting = lock(waiting);
            if waiting.is_empty() {
                return;
            }
            let room = waiting.capacity();
            std::mem::replace(&mut *waiting, Vec::with_capacity(room))
        };
        let _ = out.write_all(&lines);
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

impl<W: Write> Sink<W> {
    /// Adds `buf` to the waiting bytes; past [`MOST`], writes them.
    pub fn push(&self, buf: &[u8]) {
        let mine = self.shared.waiting.get_or_default();
        let full = {
            let mut waiting = lock(mine);
            waiting.extend_from_slice(buf);
            waiting.len() > MOST
        };
        if full {
            let mut out = lock(&self.shared.out);
            Shared::write(&mut *out, mine);
            let _ = out.flush();
        }
    }
}

impl<W: Write> Write for Sink<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.push(buf);
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
pub(crate) fn sink<W: Write + Send + 'static>(out: W) -> (Sink<W>, Flushed) {
    let shared = Arc::new(Shared {
        waiting: ThreadLocal::new(),
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
    fn past_the_bound_the_logging_thread_writes_itself() {
        let seen = Seen::default();
        let (mut sink, _guard) = sink(seen.clone());
        sink.write_all(&vec![b'x'; MOST + 1]).unwrap();
        // Written before the call returned, not by the writing thread later.
        assert_eq!(seen.0.lock().unwrap().len(), MOST + 1);
    }
}
