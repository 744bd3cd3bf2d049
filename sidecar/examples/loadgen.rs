//! Fixed-rate HTTP/1.1 load generator for `sidecar/bench/run.sh`, corrected for coordinated
//! omission: request `i` is scheduled at `start + i/rate`, and its latency is measured from that
//! scheduled time, so a stalled proxy is charged for every request it kept from being sent.
//! With `--rate 0` it runs closed-loop instead (each connection sends back to back) and reports
//! the throughput; `--requests N` makes that closed loop stop after exactly N requests (no
//! warm-up), for counting a proxy's instructions per request under valgrind. Plain std,
//! blocking sockets, one thread per keep-alive connection.
//!
//! ```text
//! loadgen --addr 127.0.0.1:4140 --rate 1000 --duration 15 [--connections 8] [--warmup 1]
//!         [--path /healthz] [--header "Host: bench.local:8080"]... [--requests N]
//! ```
//!
//! Prints one line: `requests=N errors=N rps=N p50_us=N p99_us=N p999_us=N max_us=N`.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::TcpStream,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

struct Opts {
    addr: String,
    rate: u64,
    duration: f64,
    warmup: f64,
    connections: usize,
    request: Vec<u8>,
    /// Closed loop: stop after this many requests instead of after the duration.
    requests: Option<u64>,
}

fn parse() -> Result<Opts, String> {
    let (mut addr, mut rate, mut duration, mut warmup, mut connections) =
        (None, 1000, 10.0, 1.0, 8);
    let (mut path, mut headers) = ("/".to_string(), Vec::new());
    let mut requests = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let bad = || format!("{flag}: {value:?} is not a number");
        match flag.as_str() {
            "--addr" => addr = Some(value),
            "--rate" => rate = value.parse().map_err(|_| bad())?,
            "--duration" => duration = value.parse().map_err(|_| bad())?,
            "--warmup" => warmup = value.parse().map_err(|_| bad())?,
            "--connections" => connections = value.parse().map_err(|_| bad())?,
            "--path" => path = value,
            "--header" => headers.push(value),
            "--requests" => requests = Some(value.parse().map_err(|_| bad())?),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    let addr = addr.ok_or("--addr is required")?;
    if requests.is_some() {
        if rate != 0 {
            return Err("--requests counts a closed loop: use it with --rate 0".into());
        }
        warmup = 0.0;
    }
    if !headers
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with("host:"))
    {
        headers.push(format!("Host: {addr}"));
    }
    let mut request = format!("GET {path} HTTP/1.1\r\n");
    for h in headers {
        request.push_str(&h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    Ok(Opts {
        addr,
        rate,
        duration,
        warmup,
        connections: connections.max(1),
        request: request.into_bytes(),
        requests,
    })
}

/// Reads one response; returns its status and whether the connection may be reused.
fn read_response(r: &mut BufReader<TcpStream>, line: &mut String) -> io::Result<(u16, bool)> {
    let eof = || io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed");
    line.clear();
    if r.read_line(line)? == 0 {
        return Err(eof());
    }
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad status line"))?;
    let (mut length, mut chunked, mut keep) = (0u64, false, true);
    loop {
        line.clear();
        if r.read_line(line)? == 0 {
            return Err(eof());
        }
        if line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        } else if lower.starts_with("connection:") && lower.contains("close") {
            keep = false;
        }
    }
    if chunked {
        loop {
            line.clear();
            r.read_line(line)?;
            let size = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    line.clear();
                    if r.read_line(line)? == 0 || line == "\r\n" {
                        break;
                    }
                }
                break;
            }
            io::copy(&mut r.by_ref().take(size + 2), &mut io::sink())?;
        }
    } else {
        io::copy(&mut r.by_ref().take(length), &mut io::sink())?;
    }
    Ok((status, keep))
}

/// Sleeps most of the way (the kernel's timer slack is lowered per thread), spins the rest.
fn wait_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        let d = t - now;
        if d > Duration::from_micros(60) {
            std::thread::sleep(d - Duration::from_micros(40));
        }
        while Instant::now() < t {
            std::hint::spin_loop();
        }
    }
}

#[derive(Default)]
struct Tally {
    latencies_ns: Vec<u64>,
    requests: u64,
    errors: u64,
}

fn worker(o: &Opts, next: &AtomicU64, start: Instant, total: u64, measure_from: u64) -> Tally {
    // Best effort: precise wake-ups matter at 1000 rps with microsecond latencies.
    let _ = std::fs::write("/proc/thread-self/timerslack_ns", "1");
    let mut t = Tally::default();
    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
    let mut line = String::new();
    let deadline = start + Duration::from_secs_f64(o.warmup + o.duration);
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        // Open loop: the request's slot; closed loop (rate 0): now.
        let scheduled = match (i * 1_000_000_000).checked_div(o.rate) {
            Some(offset_ns) => {
                if i >= total {
                    break;
                }
                let at = start + Duration::from_nanos(offset_ns);
                wait_until(at);
                at
            }
            None => {
                let now = Instant::now();
                let done = match o.requests {
                    Some(n) => i >= n,
                    None => now >= deadline,
                };
                if done {
                    break;
                }
                now
            }
        };
        let measured = if o.rate == 0 {
            scheduled >= start + Duration::from_secs_f64(o.warmup)
        } else {
            i >= measure_from
        };
        let result = (|| -> io::Result<(u16, bool)> {
            if conn.is_none() {
                let s = TcpStream::connect(&o.addr)?;
                s.set_nodelay(true)?;
                conn = Some((s.try_clone()?, BufReader::with_capacity(16 * 1024, s)));
            }
            let (w, r) = conn.as_mut().expect("connected above");
            w.write_all(&o.request)?;
            read_response(r, &mut line)
        })();
        let ok = match result {
            Ok((status, keep)) => {
                if !keep {
                    conn = None;
                }
                (200..300).contains(&status)
            }
            Err(_) => {
                conn = None;
                false
            }
        };
        if measured {
            t.requests += 1;
            if ok {
                t.latencies_ns.push(scheduled.elapsed().as_nanos() as u64);
            } else {
                t.errors += 1;
            }
        }
    }
    t
}

fn main() {
    let o = match parse() {
        Ok(o) => Arc::new(o),
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    };
    let measure_from = (o.warmup * o.rate as f64) as u64;
    let total = measure_from + (o.duration * o.rate as f64) as u64;
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_millis(20);
    let threads: Vec<_> = (0..o.connections)
        .map(|_| {
            let (o, next) = (o.clone(), next.clone());
            std::thread::spawn(move || worker(&o, &next, start, total, measure_from))
        })
        .collect();
    let mut all = Tally::default();
    for th in threads {
        let t = th.join().expect("worker thread");
        all.requests += t.requests;
        all.errors += t.errors;
        all.latencies_ns.extend(t.latencies_ns);
    }
    let elapsed = start.elapsed().as_secs_f64() - o.warmup;
    let lat = &mut all.latencies_ns;
    lat.sort_unstable();
    let pct = |q: f64| -> u64 {
        if lat.is_empty() {
            return 0;
        }
        let rank = ((q * lat.len() as f64).ceil() as usize).clamp(1, lat.len());
        lat[rank - 1] / 1000
    };
    println!(
        "requests={} errors={} rps={:.0} p50_us={} p99_us={} p999_us={} max_us={}",
        all.requests,
        all.errors,
        all.requests as f64 / elapsed.max(1e-9),
        pct(0.50),
        pct(0.99),
        pct(0.999),
        lat.last().map_or(0, |v| v / 1000),
    );
    if all.requests == 0 || all.errors * 2 > all.requests {
        std::process::exit(1);
    }
}
