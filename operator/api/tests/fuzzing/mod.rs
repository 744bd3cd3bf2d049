//! The machinery shared by the parser fuzz suites (`tests/fuzz.rs` of shardmesh-api,
//! shardmesh-sidecar and shardmesh-operator, which include this file by path): proptest used as
//! a coverage-free fuzzer. Inputs come from four generators — arbitrary bytes, arbitrary
//! strings, soups of format tokens, and mutations of a seed corpus kept in the repository — and
//! every call runs under a watchdog, so a hang fails the case like a panic does.
//!
//! Seed corpora are directories of files named by what the parser must do with them:
//! `ok-*` must be accepted, `err-*` refused, `tricky-*` (deep nesting, huge numbers, unicode,
//! duplicate keys, empty input) only answered in time. Line-oriented targets keep one JSON array
//! of inputs per class instead (`ok.json`, `err.json`, `tricky.json`).

#![allow(dead_code)]

use std::{
    sync::mpsc,
    time::{Duration, Instant},
};

use proptest::{prelude::*, sample::Index, test_runner::FileFailurePersistence};
use serde_json::Value;

/// Longest a single parser call may take, in a debug build on a loaded CI machine.
pub const CALL_LIMIT: Duration = Duration::from_secs(1);

/// How long a call over [`CALL_LIMIT`] is waited for before it counts as a hang (and its thread
/// is left behind): slow calls are reported with their time, and do not pile up threads that
/// starve the other tests while proptest shrinks.
pub const HANG_LIMIT: Duration = Duration::from_secs(20);

/// Largest input a mutation may produce (the span-repetition op grows inputs up to this).
pub const MAX_INPUT: usize = 256 * 1024;

/// `cases` per target, unless `PROPTEST_CASES` asks for more (or fewer) for a longer local run.
pub fn config(cases: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    // Inputs of known, recorded bugs are skipped (`prop_assume!`); they must not end the run.
    c.max_global_rejects = c.max_global_rejects.max(c.cases);
    // A failure is reported after at most a minute of shrinking, even when every step is slow.
    c.max_shrink_time = 60_000;
    // Failing cases are kept beside the crate's other ones and re-run first (cargo runs tests
    // in the package directory).
    c.failure_persistence = Some(Box::new(FileFailurePersistence::Direct(
        "proptest-regressions/fuzz.txt",
    )));
    c
}

/// Runs `f` on a thread of its own and fails (panics) when it takes longer than [`CALL_LIMIT`],
/// or does not return at all (see [`HANG_LIMIT`]); a panic inside `f` is passed on.
pub fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    let worker = std::thread::Builder::new()
        .name(format!("fuzz {what}"))
        .spawn(move || {
            let out = f();
            let _ = tx.send(());
            out
        })
        .expect("spawn the fuzz worker");
    if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(HANG_LIMIT) {
        panic!("{what}: no answer within {HANG_LIMIT:?} (a hang)");
    }
    let out = match worker.join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    let took = started.elapsed();
    assert!(
        took <= CALL_LIMIT,
        "{what}: took {took:?}, more than {CALL_LIMIT:?}"
    );
    out
}

/// An input, shown as text in failure reports (escaped where it is not UTF-8).
#[derive(Clone, PartialEq, Eq)]
pub struct Input(pub Vec<u8>);

impl Input {
    /// The input as a `&str` parser sees it after reading a file or an env var lossily.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(s) => write!(f, "Input({s:?})"),
            Err(_) => write!(f, "Input(b\"{}\")", self.0.escape_ascii()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Corpus

/// A corpus entry: file name and content.
#[derive(Clone, Debug)]
pub struct Seed {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// Every file of a corpus directory, sorted by name; a missing or empty corpus is a test bug.
pub fn corpus(dir: &str) -> Vec<Seed> {
    let mut seeds: Vec<Seed> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("corpus {dir}: {e}"))
        .map(|entry| {
            let path = entry.expect("corpus entry").path();
            Seed {
                name: path
                    .file_name()
                    .expect("file name")
                    .to_string_lossy()
                    .into_owned(),
                bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
            }
        })
        .collect();
    seeds.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(!seeds.is_empty(), "corpus {dir} is empty");
    seeds
}

/// What the parser must do with a seed, from its file name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Accept,
    Refuse,
    Answer,
}

/// The expectation of a seed named `ok-*`, `err-*` or `tricky-*` (or `ok.json` ...).
pub fn expectation(name: &str) -> Expect {
    if name.starts_with("ok") {
        Expect::Accept
    } else if name.starts_with("err") {
        Expect::Refuse
    } else {
        assert!(
            name.starts_with("tricky"),
            "{name}: corpus files are named ok-*, err-* or tricky-*"
        );
        Expect::Answer
    }
}

/// Line-oriented corpus: every string of every `*.json` array in `dir`, with the file's
/// expectation.
pub fn corpus_lines(dir: &str) -> Vec<(Expect, String)> {
    corpus(dir)
        .into_iter()
        .flat_map(|s| {
            let items: Vec<String> = serde_json::from_slice(&s.bytes)
                .unwrap_or_else(|e| panic!("{dir}/{}: a JSON array of strings: {e}", s.name));
            let expect = expectation(&s.name);
            items.into_iter().map(move |i| (expect, i))
        })
        .collect()
}

/// The dictionary a format's seeds teach: every key and every short string value in them
/// (field names, enum values, durations, addresses), leaked to live as long as the strategies.
pub fn dictionary(trees: &[Doc]) -> Vec<&'static str> {
    fn walk(d: &Doc, out: &mut std::collections::BTreeSet<String>) {
        match d {
            Doc::Str(s) if s.len() <= 64 => {
                out.insert(s.clone());
            }
            Doc::Arr(items) => items.iter().for_each(|i| walk(i, out)),
            Doc::Obj(entries) => {
                for (k, v) in entries {
                    out.insert(k.clone());
                    walk(v, out);
                }
            }
            _ => {}
        }
    }
    let mut words = std::collections::BTreeSet::new();
    trees.iter().for_each(|t| walk(t, &mut words));
    words
        .into_iter()
        .map(|w| &*Box::leak(w.into_boxed_str()))
        .collect()
}

/// The seeds that parse as JSON or YAML documents, as trees for structure-aware mutation.
pub fn trees(seeds: &[Seed]) -> Vec<Doc> {
    seeds
        .iter()
        .filter_map(|s| {
            serde_json::from_slice::<Value>(&s.bytes)
                .ok()
                .or_else(|| serde_yaml::from_slice::<Value>(&s.bytes).ok())
        })
        .filter(|v| v.is_object() || v.is_array())
        .map(|v| Doc::from_value(&v))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Dictionaries

/// Tokens of JSON and YAML syntax (and of YAML's darker corners) spliced into inputs.
pub const SYNTAX: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\"",
    "'",
    " ",
    "\n",
    "\t",
    "\r\n",
    "-",
    "- ",
    "#",
    "null",
    "~",
    "true",
    "false",
    "yes",
    "no",
    "&a ",
    "*a",
    "<<: ",
    "!!binary ",
    "!!str ",
    "!tag ",
    "? ",
    "| ",
    "> ",
    "---\n",
    "...\n",
    "%YAML 1.2\n",
    "\\",
    "\\u0000",
    "\\ud800",
    "\u{0}",
    "\u{feff}",
    "\u{202e}",
    "\u{fffd}",
    "é",
    "ß",
    "２",
    "🦀",
    "\u{10ffff}",
];

/// Numbers at and beyond the edges of every integer type the parsers decode into, and a few
/// spellings only some parsers accept.
pub const NUMBERS: &[&str] = &[
    "0",
    "-0",
    "1",
    "-1",
    "2",
    "3",
    "10",
    "100",
    "1024",
    "65535",
    "65536",
    "2147483647",
    "2147483648",
    "-2147483648",
    "-2147483649",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "123456789012345678901234567890",
    "1e308",
    "1e999",
    "-1e999",
    "1e-400",
    "1.5",
    "0.1",
    "1.0",
    "1E3",
    "0x10",
    "0o17",
    "007",
    "1_000",
    "+1",
    ".inf",
    "NaN",
];

/// Strings that mean something to some shardmesh parser (durations, addresses, header names,
/// flag values) plus hostile ones.
pub const WORDS: &[&str] = &[
    "",
    " ",
    "0",
    "1s",
    "0s",
    "250ms",
    "1m30s",
    "2m",
    "10m",
    "24h",
    "999999999h",
    "1d",
    "5 parsecs",
    "-1s",
    "1.5s",
    "10.0.0.7:4143",
    "127.0.0.1:0",
    "[::1]:4143",
    "::1",
    "10.0.0.7",
    "orders.shop:8080",
    "orders",
    "Orders:8080",
    "u@h:1",
    "x-shard-key",
    "x-write",
    "bad header",
    "header:x-write",
    "methods",
    "404",
    "410",
    "421",
    "200",
    "404,503",
    "connect-failure",
    "reset",
    "429",
    "502",
    "503",
    "504",
    "true",
    "false",
    "enabled",
    "disabled",
    "Always",
    "Never",
    "shardmesh-sidecar",
    "shardmesh-hook",
    "/var/run/shardmesh",
    "2026-01-01T00:00:00Z",
    "not a time",
    "\u{0}",
    "🦀🦀",
    "ǅ",
];

/// Soup of `tokens`: random concatenations (grammar-free but format-flavoured inputs).
pub fn soup(tokens: Vec<&'static str>) -> impl Strategy<Value = Input> {
    prop::collection::vec(prop::sample::select(tokens), 0..48)
        .prop_map(|parts| Input(parts.concat().into_bytes()))
}

/// Arbitrary bytes, arbitrary unicode strings, and token soups.
pub fn unstructured(tokens: Vec<&'static str>) -> BoxedStrategy<Input> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512).prop_map(Input),
        any::<String>().prop_map(|s| Input(s.into_bytes())),
        soup(tokens),
    ]
    .boxed()
}

/// `SYNTAX`, `NUMBERS`, `WORDS` and `extra` in one list.
pub fn tokens(extra: &[&'static str]) -> Vec<&'static str> {
    SYNTAX
        .iter()
        .chain(NUMBERS)
        .chain(WORDS)
        .chain(extra)
        .copied()
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Byte-level mutations

/// One byte-level mutation; positions are taken modulo the input's length.
#[derive(Clone, Debug)]
pub enum ByteOp {
    Flip(Index, u8),
    Set(Index, u8),
    Truncate(Index),
    Delete(Index, usize),
    Insert(Index, Vec<u8>),
    Token(Index, &'static str),
    /// Keep the input up to one point and continue with another seed from another point.
    Splice(Index, Index, Index),
    /// Repeat a span many times (size blow-up, and duplicate keys or entries).
    Repeat(Index, usize, usize),
}

fn byte_op(tokens: Vec<&'static str>) -> impl Strategy<Value = ByteOp> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| ByteOp::Flip(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| ByteOp::Set(i, b)),
        any::<Index>().prop_map(ByteOp::Truncate),
        (any::<Index>(), 1usize..32).prop_map(|(i, n)| ByteOp::Delete(i, n)),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| ByteOp::Insert(i, b)),
        (any::<Index>(), prop::sample::select(tokens)).prop_map(|(i, t)| ByteOp::Token(i, t)),
        (any::<Index>(), any::<Index>(), any::<Index>())
            .prop_map(|(s, a, b)| ByteOp::Splice(s, a, b)),
        (
            any::<Index>(),
            1usize..64,
            prop_oneof![2usize..10, 10usize..5000]
        )
            .prop_map(|(i, len, times)| ByteOp::Repeat(i, len, times)),
    ]
}

fn at(i: &Index, len: usize) -> usize {
    i.index(len + 1)
}

/// Applies `ops` to `input`; `others` are the seeds a splice may continue with.
pub fn apply_bytes(mut input: Vec<u8>, ops: &[ByteOp], others: &[Vec<u8>]) -> Vec<u8> {
    for op in ops {
        let len = input.len();
        match op {
            ByteOp::Flip(i, bit) if len > 0 => input[i.index(len)] ^= 1 << bit,
            ByteOp::Set(i, b) if len > 0 => input[i.index(len)] = *b,
            ByteOp::Flip(..) | ByteOp::Set(..) => {}
            ByteOp::Truncate(i) => input.truncate(at(i, len)),
            ByteOp::Delete(i, n) => {
                let start = at(i, len);
                input.drain(start..(start + n).min(len));
            }
            ByteOp::Insert(i, bytes) => {
                let p = at(i, len);
                input.splice(p..p, bytes.iter().copied());
            }
            ByteOp::Token(i, t) => {
                let p = at(i, len);
                input.splice(p..p, t.bytes());
            }
            ByteOp::Splice(s, a, b) => {
                if !others.is_empty() {
                    let other = &others[s.index(others.len())];
                    input.truncate(at(a, len));
                    input.extend_from_slice(&other[at(b, other.len())..]);
                }
            }
            ByteOp::Repeat(i, n, times) => {
                let start = at(i, len);
                let span = input[start..(start + n).min(len)].to_vec();
                let times = (*times).min(MAX_INPUT.saturating_sub(len) / span.len().max(1));
                let tail = input.split_off(start);
                for _ in 0..times {
                    input.extend_from_slice(&span);
                }
                input.extend_from_slice(&tail);
            }
        }
    }
    input.truncate(MAX_INPUT);
    input
}

/// A seed with up to four byte-level mutations (none: the seed as it is).
pub fn mutated_bytes(seeds: Vec<Vec<u8>>, tokens: Vec<&'static str>) -> BoxedStrategy<Input> {
    assert!(!seeds.is_empty());
    (0..seeds.len(), prop::collection::vec(byte_op(tokens), 0..5))
        .prop_map(move |(i, ops)| Input(apply_bytes(seeds[i].clone(), &ops, &seeds)))
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// Structure-aware mutations (JSON and YAML documents)

/// A JSON document that may hold what `serde_json::Value` cannot: duplicate keys, numbers of any
/// size or spelling, and raw text (deep nesting). Written as JSON, which YAML parsers read too.
#[derive(Clone, Debug, PartialEq)]
pub enum Doc {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<Doc>),
    Obj(Vec<(String, Doc)>),
    Raw(String),
}

impl Doc {
    pub fn from_value(v: &Value) -> Doc {
        match v {
            Value::Null => Doc::Null,
            Value::Bool(b) => Doc::Bool(*b),
            Value::Number(n) => Doc::Num(n.to_string()),
            Value::String(s) => Doc::Str(s.clone()),
            Value::Array(a) => Doc::Arr(a.iter().map(Doc::from_value).collect()),
            Value::Object(o) => Doc::Obj(
                o.iter()
                    .map(|(k, v)| (k.clone(), Doc::from_value(v)))
                    .collect(),
            ),
        }
    }

    /// JSON text.
    pub fn text(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) {
        let quote = |s: &str| {
            // serde_json leaves DEL, C1 controls and U+FFFE/U+FFFF raw, which YAML refuses
            // before it reads any field: escaped, a string stays a value of the document.
            let mut q = String::with_capacity(s.len() + 2);
            for c in serde_json::to_string(s)
                .expect("a string serializes")
                .chars()
            {
                if matches!(c, '\u{7f}'..='\u{84}' | '\u{86}'..='\u{9f}' | '\u{fffe}' | '\u{ffff}')
                {
                    q.push_str(&format!("\\u{:04x}", c as u32));
                } else {
                    q.push(c);
                }
            }
            q
        };
        match self {
            Doc::Null => out.push_str("null"),
            Doc::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Doc::Num(n) | Doc::Raw(n) => out.push_str(n),
            Doc::Str(s) => out.push_str(&quote(s)),
            Doc::Arr(items) => {
                out.push('[');
                for (i, d) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    d.write(out);
                }
                out.push(']');
            }
            Doc::Obj(entries) => {
                out.push('{');
                for (i, (k, d)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&quote(k));
                    out.push(':');
                    d.write(out);
                }
                out.push('}');
            }
        }
    }

    /// Number of nodes (pre-order).
    pub fn size(&self) -> usize {
        1 + match self {
            Doc::Arr(items) => items.iter().map(Doc::size).sum(),
            Doc::Obj(entries) => entries.iter().map(|(_, d)| d.size()).sum(),
            _ => 0,
        }
    }

    /// The `n`th node in pre-order, with the key of the nearest object entry above or at it.
    pub fn node_mut<'a>(
        &'a mut self,
        n: usize,
        key: Option<&'a str>,
    ) -> (&'a mut Doc, Option<&'a str>) {
        if n == 0 {
            return (self, key);
        }
        let mut n = n - 1;
        match self {
            Doc::Arr(items) => {
                for d in items {
                    let size = d.size();
                    if n < size {
                        return d.node_mut(n, key);
                    }
                    n -= size;
                }
            }
            Doc::Obj(entries) => {
                for (k, d) in entries {
                    let size = d.size();
                    if n < size {
                        return d.node_mut(n, Some(k.as_str()));
                    }
                    n -= size;
                }
            }
            _ => {}
        }
        unreachable!("node index within size()")
    }
}

/// Leaves: every JSON type, with edge-case numbers and strings (long and unicode ones too).
pub fn leaf(words: Vec<&'static str>) -> BoxedStrategy<Doc> {
    prop_oneof![
        1 => Just(Doc::Null),
        1 => any::<bool>().prop_map(Doc::Bool),
        3 => prop::sample::select(NUMBERS).prop_map(|n| Doc::Num(n.into())),
        2 => (-2i64..1100).prop_map(|n| Doc::Num(n.to_string())),
        1 => any::<i32>().prop_map(|n| Doc::Num(n.to_string())),
        1 => any::<i64>().prop_map(|n| Doc::Num(n.to_string())),
        3 => prop::sample::select(words.clone()).prop_map(|w| Doc::Str(w.into())),
        1 => ".{0,16}".prop_map(Doc::Str),
        1 => (prop::sample::select(words), 1usize..5000).prop_map(|(w, n)| Doc::Str(w.repeat(n))),
    ]
    .boxed()
}

/// Well-formed values of any type: leaves, and small arrays and objects keyed by `words`.
pub fn value(words: Vec<&'static str>) -> BoxedStrategy<Doc> {
    let keys = words.clone();
    leaf(words)
        .prop_recursive(3, 24, 4, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Doc::Arr),
                prop::collection::vec((prop::sample::select(keys.clone()), inner), 0..4).prop_map(
                    |e| Doc::Obj(e.into_iter().map(|(k, d)| (k.to_string(), d)).collect())
                ),
            ]
        })
        .boxed()
}

/// One structure-aware mutation of a document; nodes are picked by pre-order index.
#[derive(Clone, Debug)]
pub enum TreeOp {
    /// The node becomes another value (most likely of another type).
    Replace(Index, Doc),
    /// An object or array loses an entry.
    Remove(Index, Index),
    /// An object gets one of its keys a second time, with another value.
    Duplicate(Index, Index, Doc),
    /// An object gets a new entry.
    Insert(Index, &'static str, Doc),
    /// The node is wrapped in `depth` arrays (or objects): past every recursion limit.
    Nest(Index, usize, bool),
    /// The node becomes a number or literal no JSON number type can hold.
    Huge(Index, &'static str),
}

fn tree_op(words: Vec<&'static str>) -> impl Strategy<Value = TreeOp> {
    let v = value(words.clone());
    prop_oneof![
        4 => (any::<Index>(), v.clone()).prop_map(|(i, d)| TreeOp::Replace(i, d)),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(i, j)| TreeOp::Remove(i, j)),
        1 => (any::<Index>(), any::<Index>(), v.clone()).prop_map(|(i, j, d)| TreeOp::Duplicate(i, j, d)),
        1 => (any::<Index>(), prop::sample::select(words), v).prop_map(|(i, k, d)| TreeOp::Insert(i, k, d)),
        1 => (any::<Index>(), prop::sample::select(vec![2usize, 64, 127, 128, 129, 1000, 20_000]), any::<bool>())
            .prop_map(|(i, depth, arrays)| TreeOp::Nest(i, depth, arrays)),
        2 => (any::<Index>(), prop::sample::select(NUMBERS)).prop_map(|(i, n)| TreeOp::Huge(i, n)),
    ]
}

/// Applies `op` to `doc`; returns the key of the nearest object entry at or above the changed
/// node (what an error about the change should name).
pub fn apply_tree(doc: &mut Doc, op: &TreeOp) -> Option<String> {
    let size = doc.size();
    let pick = |i: &Index| i.index(size);
    match op {
        TreeOp::Replace(i, d) => {
            let (node, key) = doc.node_mut(pick(i), None);
            *node = d.clone();
            key.map(str::to_string)
        }
        TreeOp::Remove(i, j) => {
            let (node, key) = doc.node_mut(pick(i), None);
            let key = key.map(str::to_string);
            match node {
                Doc::Arr(items) if !items.is_empty() => {
                    items.remove(j.index(items.len()));
                }
                Doc::Obj(entries) if !entries.is_empty() => {
                    entries.remove(j.index(entries.len()));
                }
                _ => {}
            }
            key
        }
        TreeOp::Duplicate(i, j, d) => {
            let (node, key) = doc.node_mut(pick(i), None);
            let key = key.map(str::to_string);
            if let Doc::Obj(entries) = node {
                if !entries.is_empty() {
                    let k = entries[j.index(entries.len())].0.clone();
                    entries.push((k, d.clone()));
                }
            }
            key
        }
        TreeOp::Insert(i, k, d) => {
            let (node, key) = doc.node_mut(pick(i), None);
            let key = key.map(str::to_string);
            if let Doc::Obj(entries) = node {
                entries.push((k.to_string(), d.clone()));
            }
            key
        }
        TreeOp::Nest(i, depth, arrays) => {
            let (node, key) = doc.node_mut(pick(i), None);
            let (open, close) = if *arrays {
                ("[", "]")
            } else {
                ("{\"a\":", "}")
            };
            *node = Doc::Raw(format!(
                "{}{}{}",
                open.repeat(*depth),
                node.text(),
                close.repeat(*depth)
            ));
            key.map(str::to_string)
        }
        TreeOp::Huge(i, n) => {
            let (node, key) = doc.node_mut(pick(i), None);
            *node = Doc::Num(n.to_string());
            key.map(str::to_string)
        }
    }
}

/// A seed tree with up to three structure-aware mutations, as JSON text.
pub fn mutated_tree(trees: Vec<Doc>, words: Vec<&'static str>) -> BoxedStrategy<Input> {
    assert!(!trees.is_empty());
    (0..trees.len(), prop::collection::vec(tree_op(words), 1..4))
        .prop_map(move |(i, ops)| {
            let mut doc = trees[i].clone();
            for op in &ops {
                apply_tree(&mut doc, op);
            }
            Input(doc.text().into_bytes())
        })
        .boxed()
}

/// One well-formed value replacing one node of a seed tree: the input and the key an error
/// about it should name (`None` when the root itself was replaced).
pub fn one_replaced(trees: Vec<Doc>) -> BoxedStrategy<(Input, Option<String>)> {
    assert!(!trees.is_empty());
    let words: Vec<&'static str> = WORDS.iter().copied().chain(dictionary(&trees)).collect();
    (0..trees.len(), any::<Index>(), value(words))
        .prop_map(move |(t, i, d)| {
            let mut doc = trees[t].clone();
            let key = apply_tree(&mut doc, &TreeOp::Replace(i, d));
            (Input(doc.text().into_bytes()), key)
        })
        .boxed()
}

/// Everything at once: unstructured inputs, byte mutations of the seeds, and (for JSON/YAML
/// seeds) structure-aware mutations, all drawing on the seeds' [`dictionary`]. `extra` adds
/// format-specific tokens.
pub fn inputs(seeds: &[Seed], extra: &[&'static str]) -> BoxedStrategy<Input> {
    let bytes: Vec<Vec<u8>> = seeds.iter().map(|s| s.bytes.clone()).collect();
    let trees = trees(seeds);
    let learned = dictionary(&trees);
    let tokens: Vec<&'static str> = tokens(extra)
        .into_iter()
        .chain(learned.iter().copied())
        .collect();
    let words: Vec<&'static str> = WORDS.iter().chain(extra).chain(&learned).copied().collect();
    if trees.is_empty() {
        prop_oneof![
            1 => unstructured(tokens.clone()),
            3 => mutated_bytes(bytes, tokens),
        ]
        .boxed()
    } else {
        prop_oneof![
            1 => unstructured(tokens.clone()),
            3 => mutated_bytes(bytes, tokens),
            3 => mutated_tree(trees, words),
        ]
        .boxed()
    }
}
