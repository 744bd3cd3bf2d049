//! `shardmesh-hook`: orders pod termination so the application outlives its inbound traffic.
//!
//! The kubelet sends SIGTERM to every container of a pod at once (on Kubernetes 1.20 the sidecar
//! is a plain container), so without help the application stops while requests routed through
//! the sidecar still arrive. This binary is the application's `preStop` hook: it asks the
//! sidecar to drain (`POST /drain` on the admin port) and returns when the sidecar reports that
//! inbound traffic is done; only then does the kubelet send SIGTERM to the application. An exec
//! hook is used because the 1.20 kubelet gives an HTTP hook about one second, but waits for an
//! exec hook its full time.
//!
//! The application image may have no shell and no libc we know of, so the binary is linked
//! statically and brought in by an init container (`install`) through a shared `emptyDir`.
//! Standard library only, no dependencies.
//!
//! A `preStop` hook must never wedge termination: every runtime problem (no sidecar, timeout,
//! odd answer) is reported on one stderr line and exits 0. Only usage errors exit 2.

use std::{
    fmt,
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// The sidecar's reserved ports, shared with the operator and the sidecar (one home for the
/// numbers; included by path because this crate takes no dependencies).
#[path = "../../../operator/api/src/ports.rs"]
pub mod ports;

/// Name of the installed binary inside the target directory.
pub const BINARY_NAME: &str = "shardmesh-hook";

/// Default `--timeout` of `wait-drained`: the sidecar's own bound (drain delay 5 s + grace
/// period 20 s by default); the kubelet's `terminationGracePeriodSeconds` caps it as well.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(25);

/// Largest response read from the sidecar: only the status line matters.
const MAX_RESPONSE: usize = 4096;

/// Usage text (also printed for `--help`).
pub const USAGE: &str = "usage:
  shardmesh-hook install DIR
      copy this binary to DIR/shardmesh-hook (init container)
  shardmesh-hook wait-drained [--admin IP:PORT] [--timeout DURATION]
      preStop hook: ask the sidecar to drain and wait until inbound traffic is done
      --admin    the sidecar's admin address (default 127.0.0.1:4191)
      --timeout  give up after this long, e.g. 25s, 500ms, 1m (default 25s)";

/// A parsed command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Copy the running executable into this directory.
    Install(PathBuf),
    /// Ask the sidecar at `admin` to drain and wait up to `timeout`.
    WaitDrained {
        admin: SocketAddr,
        timeout: Duration,
    },
    /// Print the usage.
    Help,
}

/// A command line that cannot be run; the message names the argument and the fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn usage(msg: impl Into<String>) -> UsageError {
    UsageError(msg.into())
}

/// Parses the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Command, UsageError> {
    let Some((sub, rest)) = args.split_first() else {
        return Err(usage("missing subcommand; use install or wait-drained"));
    };
    match sub.as_str() {
        "-h" | "--help" | "help" => Ok(Command::Help),
        "install" => match rest {
            [dir] if !dir.is_empty() && !dir.starts_with('-') => {
                Ok(Command::Install(PathBuf::from(dir)))
            }
            [] => Err(usage(
                "install: missing DIR (the shared volume's mount path)",
            )),
            _ => Err(usage(format!(
                "install: expected exactly one DIR, got {rest:?}"
            ))),
        },
        "wait-drained" => parse_wait(rest),
        other => Err(usage(format!(
            "unknown subcommand {other:?}; use install or wait-drained"
        ))),
    }
}

fn parse_wait(mut rest: &[String]) -> Result<Command, UsageError> {
    let mut admin = SocketAddr::from(([127, 0, 0, 1], ports::SIDECAR_ADMIN));
    let mut timeout = DEFAULT_TIMEOUT;
    while let Some((flag, tail)) = rest.split_first() {
        // Both `--flag value` and `--flag=value`.
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (flag.as_str(), None),
        };
        let (value, tail) = match inline {
            Some(v) => (v, tail),
            None => match tail.split_first() {
                Some((v, t)) => (v.clone(), t),
                None => return Err(usage(format!("wait-drained: {name} needs a value"))),
            },
        };
        match name {
            "--admin" => {
                admin = value.parse().map_err(|_| {
                    usage(format!(
                        "wait-drained: --admin {value:?} is not an IP:PORT address; use e.g. \
                         127.0.0.1:{}",
                        ports::SIDECAR_ADMIN
                    ))
                })?
            }
            "--timeout" => {
                timeout = parse_duration(&value).ok_or_else(|| {
                    usage(format!(
                        "wait-drained: --timeout {value:?} is not a duration; use e.g. 25s, \
                         500ms or 1m"
                    ))
                })?
            }
            other => {
                return Err(usage(format!(
                    "wait-drained: unknown flag {other:?}; use --admin or --timeout"
                )))
            }
        }
        rest = tail;
    }
    Ok(Command::WaitDrained { admin, timeout })
}

/// `500ms`, `25s`, `1m`, `1h` (a whole number and a unit; zero is refused: a zero wait would
/// drop the ordering silently).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    (!d.is_zero()).then_some(d)
}

/// Copies `source` to `dir/shardmesh-hook` atomically: a temporary file in the same directory,
/// mode 0555, then a rename, so an application container never sees a half-written binary.
pub fn install_from(source: &Path, dir: &Path) -> io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dest = dir.join(BINARY_NAME);
    let tmp = dir.join(format!(".{BINARY_NAME}.{}.tmp", std::process::id()));
    let result = (|| {
        std::fs::copy(source, &tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o555))?;
        std::fs::rename(&tmp, &dest)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| dest)
}

/// Installs the running executable (`/proc/self/exe`) into `dir`.
pub fn install(dir: &Path) -> io::Result<PathBuf> {
    install_from(Path::new("/proc/self/exe"), dir)
}

/// How `wait-drained` ended; every outcome lets termination go on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The sidecar answered 200: inbound traffic is drained.
    Drained,
    /// Nothing listens on the admin address (no sidecar, or it already exited).
    NoSidecar,
    /// No answer within the timeout.
    TimedOut,
    /// Anything else, described.
    Unexpected(String),
}

impl Outcome {
    /// The one stderr line for outcomes other than [`Outcome::Drained`].
    pub fn message(&self, admin: SocketAddr, timeout: Duration) -> Option<String> {
        let m = match self {
            Outcome::Drained => return None,
            Outcome::NoSidecar => {
                format!("no sidecar on {admin} (connection refused); not waiting")
            }
            Outcome::TimedOut => {
                format!("the sidecar on {admin} did not report drained within {timeout:?}; not waiting longer")
            }
            Outcome::Unexpected(why) => format!("{why}; not waiting"),
        };
        Some(format!("shardmesh-hook: {m}"))
    }
}

/// Sends `POST /drain` to the sidecar's admin address and waits for its answer, at most
/// `timeout` in total. HTTP/1.0 so the sidecar closes the connection after answering.
pub fn wait_drained(admin: SocketAddr, timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let timed_out = |e: &io::Error| {
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        )
    };
    let mut stream = match TcpStream::connect_timeout(&admin, left()) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Outcome::NoSidecar,
        Err(e) if timed_out(&e) => return Outcome::TimedOut,
        Err(e) => return Outcome::Unexpected(format!("cannot connect to {admin}: {e}")),
    };
    let request = format!(
        "POST /drain HTTP/1.0\r\nHost: {admin}\r\nContent-Length: 0\r\nUser-Agent: shardmesh-hook\r\n\r\n"
    );
    let sent = stream
        .set_write_timeout(Some(left().max(Duration::from_millis(1))))
        .and_then(|()| stream.write_all(request.as_bytes()));
    match sent {
        Ok(()) => {}
        Err(e) if timed_out(&e) => return Outcome::TimedOut,
        Err(e) => return Outcome::Unexpected(format!("cannot send to {admin}: {e}")),
    }
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    // Read until the status line is complete (or the peer closes); bounded in size and time.
    while !buf.contains(&b'\n') && buf.len() < MAX_RESPONSE {
        let left = left();
        if left.is_zero() {
            return Outcome::TimedOut;
        }
        if let Err(e) = stream.set_read_timeout(Some(left)) {
            return Outcome::Unexpected(format!("cannot read from {admin}: {e}"));
        }
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n.min(MAX_RESPONSE - buf.len())]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => return Outcome::TimedOut,
            Err(e) => return Outcome::Unexpected(format!("cannot read from {admin}: {e}")),
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    judge(&buf)
}

/// The outcome for the bytes the sidecar answered.
fn judge(response: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(response);
    let status_line = text.lines().next().unwrap_or("").trim();
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or("");
    let code = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/") {
        return Outcome::Unexpected(format!("not an HTTP answer: {status_line:?}"));
    }
    if code == "200" {
        Outcome::Drained
    } else {
        Outcome::Unexpected(format!("the sidecar answered {status_line:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn wait_drained_defaults_to_the_local_admin_port() {
        assert_eq!(
            parse(&args(&["wait-drained"])),
            Ok(Command::WaitDrained {
                admin: "127.0.0.1:4191".parse().unwrap(),
                timeout: DEFAULT_TIMEOUT
            })
        );
        assert_eq!(
            parse(&args(&[
                "wait-drained",
                "--admin",
                "127.0.0.1:9000",
                "--timeout=500ms"
            ])),
            Ok(Command::WaitDrained {
                admin: "127.0.0.1:9000".parse().unwrap(),
                timeout: Duration::from_millis(500)
            })
        );
    }

    #[test]
    fn usage_errors_name_the_argument() {
        let err = |a: &[&str]| parse(&args(a)).unwrap_err().0;
        assert!(err(&[]).contains("missing subcommand"));
        assert!(err(&["stop"]).contains("\"stop\""));
        assert!(err(&["install"]).contains("missing DIR"));
        assert!(err(&["install", "a", "b"]).contains("exactly one DIR"));
        assert!(err(&["wait-drained", "--admin", "localhost:4191"]).contains("--admin"));
        assert!(err(&["wait-drained", "--admin"]).contains("--admin needs a value"));
        assert!(err(&["wait-drained", "--timeout", "soon"]).contains("--timeout"));
        assert!(err(&["wait-drained", "--timeout", "0s"]).contains("--timeout"));
        assert!(err(&["wait-drained", "--wait", "1s"]).contains("--wait"));
        assert_eq!(parse(&args(&["--help"])), Ok(Command::Help));
        assert_eq!(
            parse(&args(&["install", "/var/run/shardmesh"])),
            Ok(Command::Install("/var/run/shardmesh".into()))
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("25s"), Some(Duration::from_secs(25)));
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("750ms"), Some(Duration::from_millis(750)));
        for bad in ["", "s", "5", "1.5s", "-1s", "5d", "0ms"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn install_is_atomic_and_executable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("shardmesh-hook-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("source");
        std::fs::write(&src, b"#!binary").unwrap();
        let dest = install_from(&src, &dir).unwrap();
        assert_eq!(dest, dir.join("shardmesh-hook"));
        assert_eq!(std::fs::read(&dest).unwrap(), b"#!binary");
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o555);
        // A second install (init container restarted) replaces the read-only file.
        std::fs::write(&src, b"#!binary v2").unwrap();
        install_from(&src, &dir).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"#!binary v2");
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        assert!(install_from(&src, &dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A one-shot admin server: reads the request, waits `hold`, answers `response`.
    fn admin(
        response: &'static str,
        hold: Duration,
    ) -> (SocketAddr, std::thread::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 256];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            std::thread::sleep(hold);
            let _ = s.write_all(response.as_bytes());
            String::from_utf8_lossy(&buf).into_owned()
        });
        (addr, t)
    }

    #[test]
    fn waits_for_the_sidecar_to_answer_drained() {
        let (addr, server) = admin(
            "HTTP/1.0 200 OK\r\ncontent-length: 8\r\n\r\ndrained\n",
            Duration::from_millis(300),
        );
        let started = Instant::now();
        assert_eq!(
            wait_drained(addr, Duration::from_secs(10)),
            Outcome::Drained
        );
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "held until the answer"
        );
        let request = server.join().unwrap();
        assert!(request.starts_with("POST /drain HTTP/1.0\r\n"), "{request}");
    }

    #[test]
    fn never_wedges_termination() {
        // No sidecar.
        let refused = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert_eq!(
            wait_drained(refused, Duration::from_secs(5)),
            Outcome::NoSidecar
        );
        // A sidecar that does not answer in time.
        let (addr, _server) = admin("HTTP/1.0 200 OK\r\n\r\n", Duration::from_secs(2));
        let started = Instant::now();
        assert_eq!(
            wait_drained(addr, Duration::from_millis(200)),
            Outcome::TimedOut
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        // Another answer.
        let (addr, _server) = admin("HTTP/1.0 503 Service Unavailable\r\n\r\n", Duration::ZERO);
        let out = wait_drained(addr, Duration::from_secs(5));
        assert!(
            matches!(&out, Outcome::Unexpected(m) if m.contains("503")),
            "{out:?}"
        );
        assert!(out
            .message(addr, Duration::from_secs(5))
            .is_some_and(|m| m.starts_with("shardmesh-hook: ") && !m.contains('\n')));
        // Not HTTP at all.
        let (addr, _server) = admin("SSH-2.0-nope\r\n", Duration::ZERO);
        assert!(matches!(
            wait_drained(addr, Duration::from_secs(5)),
            Outcome::Unexpected(_)
        ));
    }
}
