//! Start-up code out of the resident set. Parsing flags, the policy, the registry and shard
//! maps, building the Kubernetes client and its TLS roots run once, but the pages of the binary
//! they touched stay mapped (and counted in the sidecar's RSS, in every pod) for the life of the
//! process: ~5 MiB of code and read-only data against ~1 MiB of heap at idle. Once start-up is
//! over, [`release_startup_pages`] unmaps the executable's clean read-only pages
//! (`MADV_DONTNEED`); what still runs (the request path, the admin server, the Lease loops)
//! faults its pages back in from the page cache, as it would after the kernel reclaimed them
//! under memory pressure. Nothing else changes: the pages stay in the page cache, shared by
//! every process that maps the file.

use std::{fs, io, ops::Range};

/// What [`release_startup_pages`] unmapped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Mappings released.
    pub mappings: usize,
    /// Resident bytes they held.
    pub bytes: u64,
}

/// One mapping of `/proc/self/smaps` that may be released.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Releasable {
    range: Range<usize>,
    rss_bytes: u64,
}

/// The mappings of `exe` in `smaps` (the text of `/proc/self/smaps`) whose pages can be dropped
/// without losing anything: not writable, and no private copy of any page (`Anonymous: 0 kB`).
/// A read-only mapping with private copies is relocated data made read-only after start-up
/// (RELRO: vtables, pointers): dropping it would bring back the unrelocated bytes of the file.
fn releasable(smaps: &str, exe: &str) -> Vec<Releasable> {
    let mut out = Vec::new();
    // The executable's read-only mapping being read, if the current one is such.
    let mut cur: Option<Candidate> = None;
    for line in smaps.lines() {
        if let Some((range, perms, path)) = header(line) {
            out.extend(cur.take().and_then(Candidate::releasable));
            let read_only_private =
                perms.as_bytes().get(1) == Some(&b'-') && perms.as_bytes().get(3) == Some(&b'p');
            cur = (read_only_private && path == exe).then_some(Candidate {
                range,
                rss_kib: 0,
                anonymous_kib: None,
            });
        } else if let Some(c) = cur.as_mut() {
            if let Some(kib) = field_kib(line, "Rss:") {
                c.rss_kib = kib;
            } else if let Some(kib) = field_kib(line, "Anonymous:") {
                c.anonymous_kib = Some(kib);
            }
        }
    }
    out.extend(cur.and_then(Candidate::releasable));
    out
}

/// A read-only private mapping of the executable, as far as its smaps lines were read.
struct Candidate {
    range: Range<usize>,
    rss_kib: u64,
    /// None until its `Anonymous:` line: not known to be clean.
    anonymous_kib: Option<u64>,
}

impl Candidate {
    fn releasable(self) -> Option<Releasable> {
        (self.anonymous_kib == Some(0) && self.rss_kib > 0).then_some(Releasable {
            range: self.range,
            rss_bytes: self.rss_kib * 1024,
        })
    }
}

/// A mapping's header line (`start-end perms offset dev inode [path]`): its range, permissions
/// and path (empty for anonymous memory).
fn header(line: &str) -> Option<(Range<usize>, &str, &str)> {
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?;
    // offset, dev, inode; a field line ("Rss:   4 kB") has no third field.
    fields.next()?;
    fields.next()?;
    fields.next()?;
    let path = fields.next().unwrap_or("").trim_start();
    (perms.len() == 4 && start < end).then_some((start..end, perms, path))
}

/// `NAME  N kB` → N.
fn field_kib(line: &str, name: &str) -> Option<u64> {
    line.strip_prefix(name)?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

/// Unmaps the clean read-only pages of this process's executable (see the module doc); call it
/// once start-up is done. Pages needed later are read back in on first use.
pub fn release_startup_pages() -> io::Result<Released> {
    let exe = fs::read_link("/proc/self/exe")?;
    let exe = exe.to_string_lossy();
    let smaps = fs::read_to_string("/proc/self/smaps")?;
    let mut released = Released::default();
    for m in releasable(&smaps, &exe) {
        // SAFETY: the range is one whole mapping of the executable that is read-only and holds
        // no private copy of a page, so discarding its page-table entries loses nothing: the
        // next access reads the same bytes back from the file, which the kernel keeps from
        // being written while it is executed. No Rust reference is invalidated.
        let rc = unsafe {
            libc::madvise(
                m.range.start as *mut libc::c_void,
                m.range.end - m.range.start,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        released.mappings += 1;
        released.bytes += m.rss_bytes;
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXE: &str = "/usr/local/bin/shardmesh-sidecar";

    fn smaps() -> String {
        [
            // ELF headers and .rodata: released.
            "5555a0000000-5555a0200000 r--p 00000000 fd:01 1234   /usr/local/bin/shardmesh-sidecar",
            "Size:               2048 kB",
            "Rss:                1480 kB",
            "Anonymous:             0 kB",
            // .text: released.
            "5555a0200000-5555a0b00000 r-xp 00200000 fd:01 1234   /usr/local/bin/shardmesh-sidecar",
            "Rss:                3556 kB",
            "Anonymous:             0 kB",
            // RELRO: read-only now, but relocated at start-up (private copies): kept.
            "5555a0b00000-5555a0b60000 r--p 00b00000 fd:01 1234   /usr/local/bin/shardmesh-sidecar",
            "Rss:                 380 kB",
            "Anonymous:           380 kB",
            // .data/.bss: writable, kept.
            "5555a0b60000-5555a0b70000 rw-p 00b60000 fd:01 1234   /usr/local/bin/shardmesh-sidecar",
            "Rss:                  28 kB",
            "Anonymous:            28 kB",
            // Someone else's file, and a heap: kept.
            "7f0000000000-7f0000100000 r-xp 00000000 fd:01 99     /usr/lib/x86_64-linux-gnu/libc.so.6",
            "Rss:                 948 kB",
            "Anonymous:             0 kB",
            "7f0000200000-7f0000300000 rw-p 00000000 00:00 0",
            "Rss:                 620 kB",
            "Anonymous:           620 kB",
            // Nothing resident: nothing to release.
            "5555a0b70000-5555a0b80000 r--p 00b70000 fd:01 1234   /usr/local/bin/shardmesh-sidecar",
            "Rss:                   0 kB",
            "Anonymous:             0 kB",
        ]
        .join("\n")
    }

    #[test]
    fn only_clean_read_only_mappings_of_the_executable_are_released() {
        let got = releasable(&smaps(), EXE);
        assert_eq!(
            got,
            vec![
                Releasable {
                    range: 0x5555a0000000..0x5555a0200000,
                    rss_bytes: 1480 * 1024
                },
                Releasable {
                    range: 0x5555a0200000..0x5555a0b00000,
                    rss_bytes: 3556 * 1024
                },
            ]
        );
        // A mapping whose Anonymous line is missing is not known to be clean: kept.
        let no_anon = "5555a0200000-5555a0b00000 r-xp 00200000 fd:01 1234   /usr/local/bin/shardmesh-sidecar\nRss: 8 kB\n";
        assert!(releasable(no_anon, EXE).is_empty());
        // Another executable's path, or a path that only starts like ours: kept.
        assert!(releasable(&smaps(), "/usr/local/bin/shardmesh").is_empty());
    }

    /// Resident KiB of this process's executable mappings that are read-only and clean.
    fn resident_kib() -> u64 {
        let exe = fs::read_link("/proc/self/exe").unwrap();
        let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
        releasable(&smaps, &exe.to_string_lossy())
            .iter()
            .map(|m| m.rss_bytes / 1024)
            .sum()
    }

    #[inline(never)]
    fn through_vtables(xs: &[Box<dyn Fn(u64) -> u64>]) -> u64 {
        xs.iter().map(|f| f(7)).sum()
    }

    #[test]
    fn releasing_shrinks_the_resident_set_and_the_process_keeps_running() {
        let before = resident_kib();
        assert!(before > 0, "this test binary has resident read-only code");
        let released = release_startup_pages().expect("madvise");
        assert!(released.mappings >= 1, "{released:?}");
        assert!(released.bytes > 0, "{released:?}");
        let after = resident_kib();
        assert!(
            after < before,
            "resident read-only pages of the executable: {before} KiB before, {after} KiB after"
        );
        // Code, relocated data (vtables) and read-only data still work after the release:
        // had RELRO been dropped, the calls through these vtables would jump to file offsets.
        let fs: Vec<Box<dyn Fn(u64) -> u64>> =
            vec![Box::new(|x| x + 1), Box::new(|x| x * 2), Box::new(|x| x)];
        assert_eq!(through_vtables(&fs), 8 + 14 + 7);
        assert_eq!(
            format!("{:?}", Released::default()),
            "Released { mappings: 0, bytes: 0 }"
        );
        // Twice is harmless.
        release_startup_pages().expect("madvise again");
    }
}
