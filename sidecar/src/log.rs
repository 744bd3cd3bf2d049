//! Process logging: JSON lines on stdout through a bounded queue and a writer thread, so a slow
//! or blocked stdout (a full pipe, a stalled log collector) never blocks a request; lines that
//! do not fit are dropped and counted. The queue is bounded in lines and in bytes, and one line
//! in bytes, so a blocked stdout costs at most [`QUEUE_BYTES`] whatever the lines carry. The level can be changed at run time from the admin
//! server.

use std::{
    io::{self, Write},
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError},
        Arc,
    },
    time::Duration,
};

use tracing_subscriber::{
    fmt::MakeWriter, layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter, Registry,
};

use crate::metrics::Metrics;

/// Lines buffered before new ones are dropped.
pub const QUEUE_LINES: usize = 16 * 1024;

/// Bytes of lines buffered before new ones are dropped: a few seconds of a busy sidecar's
/// access log (~300 bytes a line).
pub const QUEUE_BYTES: usize = 4 * 1024 * 1024;

/// Longest line written; longer ones are dropped (and counted), since a cut line is not JSON.
/// Access-log fields a client controls are clipped well below it
/// ([`crate::access_log::MAX_LOGGED_PATH`]).
pub const MAX_LINE_BYTES: usize = 16 * 1024;

enum Msg {
    Line(Vec<u8>),
    Flush(mpsc::Sender<()>),
}

/// Hands formatted lines to the writer thread.
#[derive(Clone)]
pub struct NonBlocking {
    tx: SyncSender<Msg>,
    queued: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

/// One event's bytes; sent as a unit when the formatter drops it.
pub struct LineWriter {
    buf: Vec<u8>,
    tx: SyncSender<Msg>,
    queued: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
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
        if self.buf.is_empty() {
            return;
        }
        let buf = std::mem::take(&mut self.buf);
        let len = buf.len();
        if len > MAX_LINE_BYTES || self.queued.fetch_add(len, Ordering::Relaxed) + len > QUEUE_BYTES
        {
            if len <= MAX_LINE_BYTES {
                self.queued.fetch_sub(len, Ordering::Relaxed);
            }
            self.metrics.access_log_dropped();
            return;
        }
        match self.tx.try_send(Msg::Line(buf)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.queued.fetch_sub(len, Ordering::Relaxed);
                self.metrics.access_log_dropped()
            }
        }
    }
}

impl<'a> MakeWriter<'a> for NonBlocking {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            buf: Vec::with_capacity(512),
            tx: self.tx.clone(),
            queued: self.queued.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// While lines keep coming, the writer sleeps this long between batches instead of being woken
/// for every line: a wake-up per line cost each request two context switches on the proxy's core
/// (a third of the sidecar's CPU at full load, see BENCHMARKS.md). The queue of [`QUEUE_LINES`]
/// absorbs a period's lines at over a million lines a second.
pub const WRITE_PERIOD: Duration = Duration::from_millis(5);

/// Largest batch handed to stdout in one write.
const BATCH_BYTES: usize = 64 * 1024;

fn write_batch(stdout: &io::Stdout, batch: &mut Vec<u8>) {
    if batch.is_empty() {
        return;
    }
    let mut out = stdout.lock();
    // stdout closed: nothing sensible to do but keep draining the queue.
    let _ = out.write_all(batch);
    let _ = out.flush();
    batch.clear();
}

fn writer_thread(rx: Receiver<Msg>, queued: Arc<AtomicUsize>) {
    let stdout = io::stdout();
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    let mut waiters = Vec::new();
    // Idle: block (senders wake this thread once per burst, not per line).
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        loop {
            // Drain what is queued, then write it in one go.
            let mut got = false;
            let mut disconnected = false;
            loop {
                let msg = match next.take() {
                    Some(m) => m,
                    None => match rx.try_recv() {
                        Ok(m) => m,
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            disconnected = true;
                            break;
                        }
                    },
                };
                got = true;
                match msg {
                    Msg::Line(line) => {
                        queued.fetch_sub(line.len(), Ordering::Relaxed);
                        batch.extend_from_slice(&line);
                        if batch.len() >= BATCH_BYTES {
                            write_batch(&stdout, &mut batch);
                        }
                    }
                    // Acknowledged once every line queued before it is written.
                    Msg::Flush(done) => waiters.push(done),
                }
            }
            write_batch(&stdout, &mut batch);
            for done in waiters.drain(..) {
                let _ = done.send(());
            }
            if disconnected {
                return;
            }
            if !got {
                break;
            }
            std::thread::sleep(WRITE_PERIOD);
        }
    }
}

/// Changes the log filter at run time.
pub type LevelControl = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Handle kept by `main`: flushes queued lines before exit and changes the level.
#[derive(Clone)]
pub struct Logging {
    tx: SyncSender<Msg>,
    /// Level changer for the admin server.
    pub level: LevelControl,
}

impl Logging {
    /// Waits (up to `timeout`) until every line queued so far is written.
    pub fn flush(&self, timeout: Duration) {
        let (done_tx, done_rx) = mpsc::channel();
        if self.tx.try_send(Msg::Flush(done_tx)).is_ok() {
            let _ = done_rx.recv_timeout(timeout);
        }
    }
}

/// The filter for `level` (`info`, or full `tracing` directives such as
/// `info,shardmesh_sidecar=debug`); access-log lines stay on at `info` unless disabled.
pub fn filter(level: &str, access_log: bool) -> Result<EnvFilter, String> {
    let access = if access_log { "info" } else { "off" };
    EnvFilter::try_new(format!("{level},access_log={access}"))
        .map_err(|e| format!("{level:?} is not a log level or filter: {e}; use e.g. \"info\", \"debug\" or \"info,shardmesh_sidecar=debug\""))
}

/// Installs the global JSON subscriber.
pub fn init(level: &str, access_log: bool, metrics: Arc<Metrics>) -> Result<Logging, String> {
    let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
    let queued = Arc::new(AtomicUsize::new(0));
    let writer_queued = queued.clone();
    std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || writer_thread(rx, writer_queued))
        .map_err(|e| format!("cannot start the log writer thread: {e}"))?;
    let (filter_layer, handle) =
        reload::Layer::<EnvFilter, Registry>::new(filter(level, access_log)?);
    let fmt = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_writer(NonBlocking {
            tx: tx.clone(),
            queued,
            metrics,
        });
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(fmt)
        .try_init()
        .map_err(|e| format!("cannot install the log subscriber: {e}"))?;
    let level: LevelControl = Arc::new(move |new: &str| {
        let f = filter(new, access_log)?;
        handle
            .reload(f)
            .map_err(|e| format!("cannot change the log level: {e}"))
    });
    Ok(Logging { tx, level })
}
