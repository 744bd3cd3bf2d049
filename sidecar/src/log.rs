//! Process logging: JSON lines on stdout through a bounded buffer and a writer thread, so a
//! slow or blocked stdout (a full pipe, a stalled log collector) never blocks a request; lines
//! that do not fit are dropped and counted. Lines are appended to one shared buffer (no
//! allocation or channel message per line) that the writer swaps out and writes in one go; the
//! buffer plus what the writer is writing never exceeds [`QUEUE_BYTES`], and one line never
//! exceeds [`MAX_LINE_BYTES`], so a blocked stdout costs a bounded amount of memory whatever the
//! lines carry. Access-log lines are formatted by [`crate::access_log`] and handed to
//! [`write_line`] directly; every other event goes through `tracing`. The level can be changed
//! at run time from the admin server.

use std::{
    io::{self, Write},
    sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, OnceLock},
    time::Duration,
};

use tracing_subscriber::{
    fmt::MakeWriter, layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter, Registry,
};

use crate::metrics::Metrics;

/// Bytes of lines buffered (queued plus being written) before new ones are dropped: a few
/// seconds of a busy sidecar's access log (~300 bytes a line).
pub const QUEUE_BYTES: usize = 4 * 1024 * 1024;

/// Longest line written; longer ones are dropped (and counted), since a cut line is not JSON.
/// Access-log fields a client controls are clipped well below it
/// ([`crate::access_log::MAX_LOGGED_PATH`]).
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// A buffer that grew past this while stdout was slow is given back once written.
const KEEP_CAPACITY: usize = 256 * 1024;

/// What the producers and the writer share, under one lock.
#[derive(Default)]
struct Queue {
    /// Complete lines not yet taken by the writer.
    lines: Vec<u8>,
    /// Bytes the writer took and is writing now.
    writing: usize,
    /// Flush requests, answered once everything queued before them is written.
    waiters: Vec<mpsc::Sender<()>>,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the idle writer (signalled when the queue goes from empty to not empty).
    wake: Condvar,
    metrics: Arc<Metrics>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves only bytes behind; they stay usable.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues one complete line (ending in a newline), or drops and counts it.
    fn push(&self, line: &[u8]) -> bool {
        if line.is_empty() {
            return true;
        }
        let mut q = self.lock();
        if line.len() > MAX_LINE_BYTES || q.lines.len() + q.writing + line.len() > QUEUE_BYTES {
            drop(q);
            self.metrics.access_log_dropped();
            return false;
        }
        let was_empty = q.lines.is_empty();
        q.lines.extend_from_slice(line);
        drop(q);
        if was_empty {
            self.wake.notify_one();
        }
        true
    }
}

/// The process's log queue, once [`init`] ran. Lines written before (or without) it are
/// dropped, as `tracing` drops events without a subscriber.
static SINK: OnceLock<Arc<Shared>> = OnceLock::new();

/// Queues one complete JSON line (ending in a newline) for stdout; false when it was dropped
/// (no logging installed, the queue full, or the line too long, the last two counted).
pub fn write_line(line: &[u8]) -> bool {
    match SINK.get() {
        Some(shared) => shared.push(line),
        None => false,
    }
}

/// Hands `tracing`'s formatted lines to the queue.
#[derive(Clone)]
pub struct NonBlocking {
    shared: Arc<Shared>,
}

/// One event's bytes; queued as a unit when the formatter drops it.
pub struct LineWriter {
    buf: Vec<u8>,
    shared: Arc<Shared>,
}

impl Write for LineWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        self.shared.push(&self.buf);
    }
}

impl<'a> MakeWriter<'a> for NonBlocking {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            buf: Vec::with_capacity(256),
            shared: self.shared.clone(),
        }
    }
}

/// While lines keep coming, the writer sleeps this long between batches instead of being woken
/// for every line: a wake-up per line cost each request two context switches on the proxy's core
/// (a third of the sidecar's CPU at full load, see BENCHMARKS.md).
pub const WRITE_PERIOD: Duration = Duration::from_millis(5);

fn writer_thread(shared: Arc<Shared>) {
    let stdout = io::stdout();
    let mut batch = Vec::new();
    loop {
        let waiters = {
            let mut q = shared.lock();
            // Idle: block until a line or a flush request arrives.
            while q.lines.is_empty() && q.waiters.is_empty() {
                q = shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            std::mem::swap(&mut q.lines, &mut batch);
            q.writing = batch.len();
            std::mem::take(&mut q.waiters)
        };
        let wrote = !batch.is_empty();
        if wrote {
            let mut out = stdout.lock();
            // stdout closed: nothing sensible to do but keep draining the queue.
            let _ = out.write_all(&batch);
            let _ = out.flush();
        }
        batch.clear();
        if batch.capacity() > KEEP_CAPACITY {
            batch = Vec::new();
        }
        shared.lock().writing = 0;
        for done in waiters {
            let _ = done.send(());
        }
        if wrote {
            std::thread::sleep(WRITE_PERIOD);
        }
    }
}

/// Changes the log filter at run time.
pub type LevelControl = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Handle kept by `main`: flushes queued lines before exit and changes the level.
#[derive(Clone)]
pub struct Logging {
    shared: Arc<Shared>,
    /// Level changer for the admin server.
    pub level: LevelControl,
}

impl Logging {
    /// Waits (up to `timeout`) until every line queued so far is written.
    pub fn flush(&self, timeout: Duration) {
        let (done_tx, done_rx) = mpsc::channel();
        self.shared.lock().waiters.push(done_tx);
        self.shared.wake.notify_one();
        let _ = done_rx.recv_timeout(timeout);
    }
}

/// The filter for `level` (`info`, or full `tracing` directives such as
/// `info,shardmesh_sidecar=debug`). Access-log lines do not pass it: `--access-log` alone
/// switches them.
pub fn filter(level: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(level)
        .map_err(|e| format!("{level:?} is not a log level or filter: {e}; use e.g. \"info\", \"debug\" or \"info,shardmesh_sidecar=debug\""))
}

/// Installs the global JSON subscriber and the queue behind it and [`write_line`].
pub fn init(level: &str, metrics: Arc<Metrics>) -> Result<Logging, String> {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        wake: Condvar::new(),
        metrics,
    });
    if SINK.set(shared.clone()).is_err() {
        return Err("logging is already installed".into());
    }
    let writer = shared.clone();
    std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || writer_thread(writer))
        .map_err(|e| format!("cannot start the log writer thread: {e}"))?;
    let (filter_layer, handle) = reload::Layer::<EnvFilter, Registry>::new(filter(level)?);
    let fmt = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_writer(NonBlocking {
            shared: shared.clone(),
        });
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(fmt)
        .try_init()
        .map_err(|e| format!("cannot install the log subscriber: {e}"))?;
    let level: LevelControl = Arc::new(move |new: &str| {
        let f = filter(new)?;
        handle
            .reload(f)
            .map_err(|e| format!("cannot change the log level: {e}"))
    });
    Ok(Logging { shared, level })
}
