//! The chart's Grafana dashboard (`charts/shardmesh/dashboards/shardmesh.json`) against what the
//! components really export. A renamed metric or label leaves a panel silently empty, so the
//! metric names and label names every panel query and template variable uses are extracted
//! (a small PromQL reader below) and looked up in the `/metrics` of a running operator, its
//! webhook and a sidecar that routed keyed traffic. The dashboard's own shape (data source
//! variable everywhere, unique panel ids, variables honoured) is checked without a cluster.

mod mesh;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use http_body_util::BodyExt;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Pod, ResourceQuota},
};
use kube::{
    api::{ListParams, PostParams},
    Api,
};
use serde_json::{json, Value};
use shardmesh_api::{
    ports,
    shardmap::{ShardMap, ShardMapSlice},
    ShardedService,
};
use shardmesh_e2e::{
    apply_service, client, demo_service, wait_for, write_artifact, TestNamespace,
    OPERATOR_NAMESPACE, WAIT,
};

/// The dashboard the chart ships, as the ConfigMap carries it.
const DASHBOARD: &str = include_str!("../../charts/shardmesh/dashboards/shardmesh.json");

/// Labels Prometheus attaches to every series at scrape time (from the target's pod): a panel
/// may use them although no component exports them.
const SCRAPE_LABELS: [&str; 2] = ["namespace", "pod"];

/// What every panel and query variable names as its data source: the dashboard's `datasource`
/// variable, so the dashboard works with whatever the Prometheus data source is called.
const DATASOURCE_UID: &str = "${datasource}";

/// Reads the metric names and label names out of a PromQL expression (as Grafana sends it:
/// `$variables` stand where numbers or durations go, and `label_values(...)` of a template
/// variable is understood too).
mod promql {
    use std::{collections::BTreeSet, ops::Range};

    /// One metric an expression reads and the label names it relies on for it: those of its
    /// selector's matchers, of enclosing `by`/`without` and `on`/`ignoring`/`group_*` clauses,
    /// `le` inside `histogram_quantile`, and the label a `label_values` variable lists.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct Use {
        /// Metric name as queried (`x_bucket`, `x_total`).
        pub metric: String,
        /// Label names used on it (never `__name__`).
        pub labels: BTreeSet<String>,
        /// The selector's matchers as (label, operator, value), for checks of the filters.
        pub matchers: Vec<(String, String, String)>,
    }

    /// The metrics `expr` reads, in order of appearance; an error names the byte offset of
    /// what could not be read.
    pub fn uses(expr: &str) -> Result<Vec<Use>, String> {
        let toks = lex(expr)?;
        let mut p = Parser {
            toks,
            pos: 0,
            out: Vec::new(),
            end: expr.len(),
        };
        p.expr()?;
        match p.toks.get(p.pos) {
            None => Ok(p.out),
            Some((at, t)) => Err(format!("unexpected {t:?} at byte {at}")),
        }
    }

    #[derive(Clone, Debug, PartialEq)]
    enum Tok {
        Ident(String),
        /// A number or duration (`0.99`, `1e-3`, `5m`) or a Grafana variable standing for one.
        Num,
        Str(String),
        /// A range or subquery (`[5m]`, `[$__rate_interval]`, `[1h:5m]`), kept opaque.
        Range,
        Op(&'static str),
        LParen,
        RParen,
        LBrace,
        RBrace,
        Comma,
    }

    /// Operators longest first, so `=~` is not read as `=` and `~`.
    const OPS: [&str; 16] = [
        "==", "!=", "<=", ">=", "=~", "!~", "+", "-", "*", "/", "%", "^", "<", ">", "=", "@",
    ];
    const AGGREGATORS: [&str; 14] = [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    /// Words that cannot start an operand.
    const KEYWORDS: [&str; 11] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "and",
        "or",
        "unless",
    ];

    fn lex(s: &str) -> Result<Vec<(usize, Tok)>, String> {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            let start = i;
            let ident_char = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
            if c.is_ascii_whitespace() {
                i += 1;
                continue;
            }
            if c == b'#' {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            let tok = if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
                while i < b.len() && ident_char(b[i]) {
                    i += 1;
                }
                Tok::Ident(s[start..i].to_string())
            } else if c.is_ascii_digit()
                || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
            {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    let exponent = (b[i] == b'e' || b[i] == b'E')
                        && matches!(b.get(i + 1), Some(b'+' | b'-'))
                        && !s[start..i].contains(['x', 'X']);
                    i += if exponent { 2 } else { 1 };
                }
                Tok::Num
            } else if c == b'$' {
                // `${name}`, `${name:format}` or `$name`: a variable in place of a value.
                if b.get(i + 1) == Some(&b'{') {
                    let close = s[i..]
                        .find('}')
                        .ok_or_else(|| format!("unclosed ${{ at byte {start}"))?;
                    i += close + 1;
                } else {
                    i += 1;
                    while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                        i += 1;
                    }
                }
                Tok::Num
            } else if c == b'"' || c == b'\'' || c == b'`' {
                let mut value = String::new();
                i += 1;
                loop {
                    let Some(&d) = b.get(i) else {
                        return Err(format!("unclosed string at byte {start}"));
                    };
                    if d == c {
                        i += 1;
                        break;
                    }
                    if d == b'\\' && c != b'`' {
                        i += 1;
                    }
                    // Copy one whole UTF-8 character.
                    let ch = s
                        .get(i..)
                        .and_then(|r| r.chars().next())
                        .ok_or_else(|| format!("unclosed string at byte {start}"))?;
                    value.push(ch);
                    i += ch.len_utf8();
                }
                Tok::Str(value)
            } else if c == b'[' {
                let close = s[i..]
                    .find(']')
                    .ok_or_else(|| format!("unclosed [ at byte {start}"))?;
                i += close + 1;
                Tok::Range
            } else {
                i += 1;
                match c {
                    b'(' => Tok::LParen,
                    b')' => Tok::RParen,
                    b'{' => Tok::LBrace,
                    b'}' => Tok::RBrace,
                    b',' => Tok::Comma,
                    _ => {
                        let op = OPS
                            .iter()
                            .find(|op| s[start..].starts_with(**op))
                            .ok_or_else(|| {
                                format!("unexpected character {:?} at byte {start}", c as char)
                            })?;
                        i = start + op.len();
                        Tok::Op(op)
                    }
                }
            };
            out.push((start, tok));
        }
        Ok(out)
    }

    struct Parser {
        toks: Vec<(usize, Tok)>,
        pos: usize,
        /// Every metric read so far; a sub-expression's uses are a contiguous range of it.
        out: Vec<Use>,
        end: usize,
    }

    impl Parser {
        fn peek(&self) -> Option<&Tok> {
            self.toks.get(self.pos).map(|(_, t)| t)
        }

        fn at(&self) -> usize {
            self.toks.get(self.pos).map_or(self.end, |(at, _)| *at)
        }

        fn next(&mut self) -> Result<Tok, String> {
            let t = self
                .toks
                .get(self.pos)
                .map(|(_, t)| t.clone())
                .ok_or_else(|| "unexpected end of the expression".to_string())?;
            self.pos += 1;
            Ok(t)
        }

        fn expect(&mut self, want: Tok) -> Result<(), String> {
            let at = self.at();
            match self.next()? {
                t if t == want => Ok(()),
                t => Err(format!("expected {want:?} at byte {at}, found {t:?}")),
            }
        }

        fn eat_ident(&mut self, words: &[&str]) -> bool {
            let hit = matches!(self.peek(), Some(Tok::Ident(w)) if words.contains(&w.as_str()));
            if hit {
                self.pos += 1;
            }
            hit
        }

        fn add_labels(&mut self, range: Range<usize>, labels: &[String]) {
            for u in &mut self.out[range] {
                u.labels.extend(labels.iter().cloned());
            }
        }

        /// Operands joined by binary operators. Precedence does not matter for which metrics
        /// and labels are used, except for the matching clause, which is given to the operands
        /// right beside its operator.
        fn expr(&mut self) -> Result<Range<usize>, String> {
            let start = self.out.len();
            let mut lhs = self.unary()?;
            loop {
                let binary = match self.peek() {
                    Some(Tok::Op(op)) => !matches!(*op, "=" | "=~" | "!~" | "@"),
                    Some(Tok::Ident(w)) => ["and", "or", "unless", "atan2"].contains(&w.as_str()),
                    _ => false,
                };
                if !binary {
                    break;
                }
                self.pos += 1;
                self.eat_ident(&["bool"]);
                let mut matching = Vec::new();
                if self.eat_ident(&["on", "ignoring"]) {
                    matching.extend(self.label_list()?);
                }
                if self.eat_ident(&["group_left", "group_right"])
                    && self.peek() == Some(&Tok::LParen)
                {
                    matching.extend(self.label_list()?);
                }
                let rhs = self.unary()?;
                self.add_labels(lhs, &matching);
                self.add_labels(rhs.clone(), &matching);
                lhs = rhs;
            }
            Ok(start..self.out.len())
        }

        fn unary(&mut self) -> Result<Range<usize>, String> {
            while matches!(self.peek(), Some(Tok::Op("+" | "-"))) {
                self.pos += 1;
            }
            let r = self.primary()?;
            self.postfix()?;
            Ok(r)
        }

        /// Ranges, subqueries, `offset` and `@` after an operand.
        fn postfix(&mut self) -> Result<(), String> {
            loop {
                match self.peek() {
                    Some(Tok::Range) => self.pos += 1,
                    Some(Tok::Ident(w)) if w == "offset" => {
                        self.pos += 1;
                        if self.peek() == Some(&Tok::Op("-")) {
                            self.pos += 1;
                        }
                        self.expect(Tok::Num)?;
                    }
                    Some(Tok::Op("@")) => {
                        self.pos += 1;
                        if self.eat_ident(&["start", "end"]) {
                            self.expect(Tok::LParen)?;
                            self.expect(Tok::RParen)?;
                        } else {
                            self.expect(Tok::Num)?;
                        }
                    }
                    _ => return Ok(()),
                }
            }
        }

        fn primary(&mut self) -> Result<Range<usize>, String> {
            let start = self.out.len();
            let at = self.at();
            match self.next()? {
                Tok::LParen => {
                    self.expr()?;
                    self.expect(Tok::RParen)?;
                }
                Tok::Num | Tok::Str(_) => {}
                Tok::LBrace => {
                    self.pos -= 1;
                    let matchers = self.matchers()?;
                    let name = matchers
                        .iter()
                        .find(|(l, op, _)| l == "__name__" && op == "=")
                        .map(|(_, _, v)| v.clone())
                        .ok_or_else(|| {
                            format!("selector at byte {at} has no literal metric name")
                        })?;
                    self.push_selector(name, matchers);
                }
                Tok::Ident(name) => {
                    let lower = name.to_ascii_lowercase();
                    let next = self.peek().cloned();
                    if lower == "inf" || lower == "nan" {
                        // A number.
                    } else if KEYWORDS.contains(&name.as_str()) {
                        return Err(format!("unexpected {name:?} at byte {at}"));
                    } else if AGGREGATORS.contains(&name.as_str())
                        && (next == Some(Tok::LParen)
                            || matches!(&next, Some(Tok::Ident(w)) if w == "by" || w == "without"))
                    {
                        self.aggregation()?;
                    } else if next == Some(Tok::LParen) {
                        self.call(&name)?;
                    } else {
                        let matchers = if next == Some(Tok::LBrace) {
                            self.matchers()?
                        } else {
                            Vec::new()
                        };
                        self.push_selector(name, matchers);
                    }
                }
                t => return Err(format!("unexpected {t:?} at byte {at}")),
            }
            Ok(start..self.out.len())
        }

        fn push_selector(&mut self, metric: String, matchers: Vec<(String, String, String)>) {
            let labels = matchers
                .iter()
                .map(|(l, _, _)| l.clone())
                .filter(|l| l != "__name__")
                .collect();
            self.out.push(Use {
                metric,
                labels,
                matchers,
            });
        }

        /// `{label op "value", ...}`.
        fn matchers(&mut self) -> Result<Vec<(String, String, String)>, String> {
            self.expect(Tok::LBrace)?;
            let mut out = Vec::new();
            while self.peek() != Some(&Tok::RBrace) {
                let at = self.at();
                let label = match self.next()? {
                    Tok::Ident(l) | Tok::Str(l) => l,
                    t => return Err(format!("expected a label name at byte {at}, found {t:?}")),
                };
                let at = self.at();
                let op = match self.next()? {
                    Tok::Op(op @ ("=" | "!=" | "=~" | "!~")) => op,
                    t => return Err(format!("expected a matcher at byte {at}, found {t:?}")),
                };
                let at = self.at();
                let value = match self.next()? {
                    Tok::Str(v) => v,
                    t => return Err(format!("expected a quoted value at byte {at}, found {t:?}")),
                };
                out.push((label, op.to_string(), value));
                if self.peek() == Some(&Tok::Comma) {
                    self.pos += 1;
                } else {
                    break;
                }
            }
            self.expect(Tok::RBrace)?;
            Ok(out)
        }

        /// `(a, b, "c")`.
        fn label_list(&mut self) -> Result<Vec<String>, String> {
            self.expect(Tok::LParen)?;
            let mut out = Vec::new();
            while self.peek() != Some(&Tok::RParen) {
                let at = self.at();
                match self.next()? {
                    Tok::Ident(l) | Tok::Str(l) => out.push(l),
                    t => return Err(format!("expected a label name at byte {at}, found {t:?}")),
                }
                if self.peek() == Some(&Tok::Comma) {
                    self.pos += 1;
                } else {
                    break;
                }
            }
            self.expect(Tok::RParen)?;
            Ok(out)
        }

        fn grouping(&mut self) -> Result<Vec<String>, String> {
            if self.eat_ident(&["by", "without"]) {
                self.label_list()
            } else {
                Ok(Vec::new())
            }
        }

        /// `(arg, arg, ...)`, each argument's range of uses.
        fn args(&mut self) -> Result<Vec<Range<usize>>, String> {
            self.expect(Tok::LParen)?;
            let mut out = Vec::new();
            while self.peek() != Some(&Tok::RParen) {
                out.push(self.expr()?);
                if self.peek() == Some(&Tok::Comma) {
                    self.pos += 1;
                } else {
                    break;
                }
            }
            self.expect(Tok::RParen)?;
            Ok(out)
        }

        /// `sum by (a) (expr)` or `sum (expr) by (a)`: the grouping labels are used on every
        /// metric inside.
        fn aggregation(&mut self) -> Result<(), String> {
            let mut grouping = self.grouping()?;
            let args = self.args()?;
            grouping.extend(self.grouping()?);
            if let (Some(first), Some(last)) = (args.first(), args.last()) {
                self.add_labels(first.start..last.end, &grouping);
            }
            Ok(())
        }

        fn call(&mut self, name: &str) -> Result<(), String> {
            let at = self.at();
            let args = self.args()?;
            match name {
                // Quantiles are computed over the `le` buckets of the metrics inside.
                "histogram_quantile" => {
                    if let Some(r) = args.get(1) {
                        self.add_labels(r.clone(), &["le".to_string()]);
                    }
                }
                // Grafana's variable query: `label_values(label)` or
                // `label_values(selector, label)`; the label was read as a bare selector.
                "label_values" => {
                    let label = match self.out.last() {
                        Some(u)
                            if u.matchers.is_empty()
                                && args.last().is_some_and(|r| r.len() == 1) =>
                        {
                            u.metric.clone()
                        }
                        _ => {
                            return Err(format!(
                                "label_values at byte {at}: the last argument must be a label name"
                            ))
                        }
                    };
                    self.out.pop();
                    if let Some(r) = args.first().filter(|_| args.len() == 2) {
                        self.add_labels(r.clone(), &[label]);
                    }
                }
                _ => {}
            }
            Ok(())
        }
    }
}

/// What Prometheus would scrape from some `/metrics` endpoints: the label names of each series
/// name, and the families' declared types.
#[derive(Debug, Default)]
struct Exports {
    /// Series name (as a query names it: `x_bucket`, `x_total`) → label names on its samples.
    series: BTreeMap<String, BTreeSet<String>>,
    /// `# TYPE` family name → type (`counter`, `histogram`...).
    types: BTreeMap<String, String>,
}

/// How a queried metric name is found among the exports.
#[derive(Debug, PartialEq)]
enum Found<'a> {
    /// Samples of it exist, with these label names.
    Series(&'a BTreeSet<String>),
    /// Its family is declared (a histogram's `_bucket` / `_sum` / `_count`, an OpenMetrics
    /// counter's `_total`, or the name itself) but has no sample yet: its labels are unknown.
    Declared,
    Missing,
}

impl Exports {
    /// Adds one scrape in the Prometheus text format (0.0.4) or OpenMetrics.
    fn add(&mut self, text: &str) -> Result<(), String> {
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if let Some(decl) = line.strip_prefix("# TYPE ") {
                let mut words = decl.split_whitespace();
                if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                    self.types.insert(name.to_string(), kind.to_string());
                }
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, labels) =
                sample_labels(line).map_err(|e| format!("line {}: {e}: {line}", n + 1))?;
            self.series.entry(name).or_default().extend(labels);
        }
        Ok(())
    }

    fn find(&self, metric: &str) -> Found<'_> {
        if let Some(labels) = self.series.get(metric) {
            return Found::Series(labels);
        }
        let declared = self.types.contains_key(metric)
            || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                self.family(metric, suffix)
                    .is_some_and(|t| t == "histogram")
            })
            || self
                .family(metric, "_total")
                .is_some_and(|t| t == "counter");
        if declared {
            Found::Declared
        } else {
            Found::Missing
        }
    }

    /// The declared type of the family `metric` belongs to if it ends with `suffix`.
    fn family(&self, metric: &str, suffix: &str) -> Option<&str> {
        let base = metric.strip_suffix(suffix)?;
        self.types.get(base).map(String::as_str)
    }

    fn is_histogram_bucket(&self, metric: &str) -> bool {
        self.family(metric, "_bucket") == Some("histogram")
    }
}

/// The name and label names of one sample line (`name{a="x",b="y\"z"} 1 [timestamp]`).
fn sample_labels(line: &str) -> Result<(String, Vec<String>), String> {
    let end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = line[..end].to_string();
    let mut labels = Vec::new();
    let mut rest = &line[end..];
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = rest.find('=').ok_or("label without value")?;
            labels.push(rest[..eq].trim().to_string());
            rest = rest[eq + 1..]
                .strip_prefix('"')
                .ok_or("label value not quoted")?;
            let mut escaped = false;
            let close = rest
                .char_indices()
                .find(|(_, c)| {
                    let closes = *c == '"' && !escaped;
                    escaped = *c == '\\' && !escaped;
                    closes
                })
                .map(|(i, _)| i)
                .ok_or("unclosed label value")?;
            rest = &rest[close + 1..];
        }
    }
    if rest.split_whitespace().next().is_none() {
        return Err("no value".into());
    }
    Ok((name, labels))
}

/// One query of the dashboard and where it is shown.
#[derive(Debug)]
struct Query {
    /// The panel's title, or `variable $name`.
    source: String,
    expr: String,
}

/// Every panel's queries (rows' nested panels included) and every query variable's query.
fn queries(dashboard: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    for p in all_panels(dashboard) {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push(Query {
                    source: p["title"].as_str().unwrap_or("(untitled)").to_string(),
                    expr: expr.to_string(),
                });
            }
        }
    }
    for v in variables(dashboard).filter(|v| v["type"] == "query") {
        let q = &v["query"];
        if let Some(expr) = q.as_str().or_else(|| q["query"].as_str()) {
            out.push(Query {
                source: format!("variable ${}", v["name"].as_str().unwrap_or("?")),
                expr: expr.to_string(),
            });
        }
    }
    out
}

/// Every panel: the top-level ones, rows included, and the panels of collapsed rows.
fn all_panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

fn variables(dashboard: &Value) -> impl Iterator<Item = &Value> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
}

/// What the dashboard queries that `exports` does not have: one line per metric or label,
/// naming the panel. Labels Prometheus adds at scrape time and a histogram's `le` are exempt.
fn missing(queries: &[Query], exports: &Exports) -> Vec<String> {
    let mut problems = BTreeSet::new();
    for q in queries {
        let uses = match promql::uses(&q.expr) {
            Ok(u) => u,
            Err(e) => {
                problems.insert(format!("{}: cannot read {:?}: {e}", q.source, q.expr));
                continue;
            }
        };
        for u in uses {
            let needed: Vec<&String> = u
                .labels
                .iter()
                .filter(|l| !SCRAPE_LABELS.contains(&l.as_str()))
                .filter(|l| !(*l == "le" && exports.is_histogram_bucket(&u.metric)))
                .collect();
            match exports.find(&u.metric) {
                Found::Missing => {
                    problems.insert(format!("{}: metric {} is not exported", q.source, u.metric));
                }
                Found::Declared if !needed.is_empty() => {
                    problems.insert(format!(
                        "{}: metric {} is declared but has no series, so its labels {needed:?} \
                         cannot be checked",
                        q.source, u.metric
                    ));
                }
                Found::Declared => {}
                Found::Series(have) => {
                    for l in needed.into_iter().filter(|l| !have.contains(*l)) {
                        problems.insert(format!(
                            "{}: metric {} has no label {l} (its series have {have:?})",
                            q.source, u.metric
                        ));
                    }
                }
            }
        }
    }
    problems.into_iter().collect()
}

fn dashboard() -> Value {
    serde_json::from_str(DASHBOARD).expect("charts/shardmesh/dashboards/shardmesh.json is JSON")
}

fn uses(expr: &str) -> Vec<(String, Vec<String>)> {
    promql::uses(expr)
        .unwrap_or_else(|e| panic!("{expr}: {e}"))
        .into_iter()
        .map(|u| (u.metric, u.labels.into_iter().collect()))
        .collect()
}

fn pair(metric: &str, labels: &[&str]) -> (String, Vec<String>) {
    (
        metric.to_string(),
        labels.iter().map(|l| l.to_string()).collect(),
    )
}

#[test]
fn the_extractor_reads_metrics_and_labels_of_tricky_queries() {
    assert_eq!(uses("rate(x[5m])"), [pair("x", &[])]);
    assert_eq!(
        uses("sum by (a, b) (rate(x{c=\"1\"}[5m]))"),
        [pair("x", &["a", "b", "c"])]
    );
    assert_eq!(
        uses(
            "histogram_quantile(0.99, sum by (le, destination) \
             (rate(x_bucket{namespace=~\"$namespace\"}[$__rate_interval])))"
        ),
        [pair("x_bucket", &["destination", "le", "namespace"])]
    );
    // histogram_quantile alone implies le; grouping after the argument counts too.
    assert_eq!(
        uses("histogram_quantile($q, sum(rate(h_bucket[1m])) by (job))"),
        [pair("h_bucket", &["job", "le"])]
    );
    // A string may hold anything that looks like PromQL: it is not read as a metric.
    assert_eq!(
        uses(r#"count_values("v", up{a=~"x{y}[z]\"sum(q)", b!~'it\'s'})"#),
        [pair("up", &["a", "b"])]
    );
    // Binary operators: each side's metrics, the matching labels on both operands.
    assert_eq!(
        uses("sum by (d) (rate(a[1m])) / on (d) group_left (e) sum by (d, e) (rate(b[1m])) > 0.5"),
        [pair("a", &["d", "e"]), pair("b", &["d", "e"])]
    );
    assert_eq!(
        uses("a and ignoring (p) b or c unless d"),
        [
            pair("a", &["p"]),
            pair("b", &["p"]),
            pair("c", &[]),
            pair("d", &[])
        ]
    );
    assert_eq!(
        uses("sum without (pod) (x) * -1 + vector(1) - (y == bool 1)"),
        [pair("x", &["pod"]), pair("y", &[])]
    );
    // Offsets, @, subqueries, metric names with colons, names given as __name__, Inf.
    assert_eq!(
        uses("max_over_time(rate(ns:x:rate5m[5m] offset -1h)[30m:1m]) @ end() > +Inf"),
        [pair("ns:x:rate5m", &[])]
    );
    assert_eq!(
        uses(r#"{__name__="x_total", shard="0"} offset $__interval"#),
        [pair("x_total", &["shard"])]
    );
    assert_eq!(
        uses("topk(5, sum by (pod) (increase(x[$__range]))) # a comment\n"),
        [pair("x", &["pod"])]
    );
    assert_eq!(uses("1e-3 * 2 ^ 0x1F"), []);
    // Grafana variable queries.
    assert_eq!(
        uses(r#"label_values(m{namespace=~"$namespace"}, destination)"#),
        [pair("m", &["destination", "namespace"])]
    );
    assert_eq!(uses("label_values(namespace)"), []);
    // Mistakes are reported with where they are, not skipped.
    for bad in [
        "sum by (a (x)",
        "x{a=}",
        "rate(x[5m]",
        r#"{a="b"}"#,
        "x{a=\"b}",
        "sum by a (x)",
        "x +",
        "label_values(m, a{b=\"c\"})",
        "x y",
    ] {
        assert!(promql::uses(bad).is_err(), "{bad} must not be read");
    }
}

/// An exposition of each shape the components render: the sidecar's 0.0.4 text and the
/// operator's OpenMetrics (counter family declared without `_total`).
const EXPOSITION: &str = r#"# HELP shardmesh_requests_total Requests handled.
# TYPE shardmesh_requests_total counter
shardmesh_requests_total{direction="inbound",status_class="2xx"} 3
# TYPE shardmesh_request_duration_seconds histogram
shardmesh_request_duration_seconds_bucket{direction="inbound",le="0.001"} 1
shardmesh_request_duration_seconds_bucket{direction="inbound",le="+Inf"} 3
shardmesh_request_duration_seconds_sum{direction="inbound"} 0.2
shardmesh_request_duration_seconds_count{direction="inbound"} 3
shardmesh_upstream_attempts_total 7
# TYPE odd gauge
odd{path="a\"b,c=d}",x="1"} 2 1700000000000
# HELP shardmesh_operator_reconcile_errors Failed reconciles.
# TYPE shardmesh_operator_reconcile_errors counter
# TYPE shardmesh_webhook_admission_duration_seconds histogram
# EOF
"#;

#[test]
fn exports_are_read_from_both_exposition_formats() {
    let mut e = Exports::default();
    e.add(EXPOSITION).expect("parses");
    let labels = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        e.find("shardmesh_requests_total"),
        Found::Series(&labels(&["direction", "status_class"]))
    );
    assert_eq!(
        e.find("shardmesh_request_duration_seconds_bucket"),
        Found::Series(&labels(&["direction", "le"]))
    );
    assert_eq!(
        e.find("shardmesh_upstream_attempts_total"),
        Found::Series(&labels(&[]))
    );
    assert_eq!(e.find("odd"), Found::Series(&labels(&["path", "x"])));
    assert_eq!(
        e.find("shardmesh_operator_reconcile_errors_total"),
        Found::Declared
    );
    assert_eq!(
        e.find("shardmesh_webhook_admission_duration_seconds_count"),
        Found::Declared
    );
    assert_eq!(e.find("shardmesh_requests"), Found::Missing);
    assert_eq!(
        e.find("shardmesh_operator_reconcile_errors_sum"),
        Found::Missing
    );
    assert!(Exports::default().add("x{a=\"1\"}").is_err());
    assert!(Exports::default().add("x{a=1} 2").is_err());
}

#[test]
fn missing_metrics_and_labels_are_named_with_their_panel() {
    let mut e = Exports::default();
    e.add(EXPOSITION).expect("parses");
    let q = |source: &str, expr: &str| Query {
        source: source.into(),
        expr: expr.into(),
    };
    let problems = missing(
        &[
            q(
                "ok",
                "histogram_quantile(0.9, sum by (le, pod) (rate(shardmesh_request_duration_seconds_bucket{namespace=\"a\", direction=\"inbound\"}[5m])))",
            ),
            q("ok too", "sum by (le) (rate(shardmesh_webhook_admission_duration_seconds_bucket[5m]))"),
            q("renamed", "rate(shardmesh_request_total[5m])"),
            q("label", "sum by (status) (rate(shardmesh_requests_total[5m]))"),
            q("no series", "sum by (reason) (rate(shardmesh_operator_reconcile_errors_total[5m]))"),
            q("le on a counter", "sum by (le) (shardmesh_requests_total)"),
            q("broken", "sum(("),
        ],
        &e,
    );
    let sources: Vec<&str> = problems
        .iter()
        .map(|p| p.split(':').next().unwrap_or_default())
        .collect();
    assert_eq!(
        sources,
        ["broken", "label", "le on a counter", "no series", "renamed"],
        "{problems:#?}"
    );
    assert!(problems[1].contains("no label status"), "{problems:#?}");
}

#[test]
fn every_panel_uses_the_datasource_variable_and_has_a_unique_id() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion"
    );
    assert!(d["uid"].is_string(), "a fixed uid keeps links stable");
    let vars: Vec<&Value> = variables(&d).collect();
    assert!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a `datasource` variable of type datasource (query prometheus)"
    );
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert_eq!(
            v["datasource"]["uid"], DATASOURCE_UID,
            "variable {}",
            v["name"]
        );
    }
    let mut ids = BTreeSet::new();
    let panels = all_panels(&d);
    let mut titles = Vec::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("(untitled)");
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel {title:?} has no numeric id"));
        assert!(ids.insert(id), "panel id {id} used twice ({title:?})");
        if p["type"] == "row" {
            continue;
        }
        titles.push(title);
        assert_eq!(p["datasource"]["uid"], DATASOURCE_UID, "panel {title:?}");
        let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        assert!(!targets.is_empty(), "panel {title:?} queries nothing");
        for t in targets {
            assert!(
                t["expr"].is_string(),
                "panel {title:?}: target without expr"
            );
            assert!(
                t["datasource"].is_null() || t["datasource"]["uid"] == DATASOURCE_UID,
                "panel {title:?}: a target names another data source"
            );
        }
    }
    let rows: Vec<&str> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    assert_eq!(
        rows,
        [
            "Sidecar destinations (per destination and shard)",
            "Sidecar inbound",
            "Operator",
            "Webhook"
        ]
    );
    let unique: BTreeSet<&&str> = titles.iter().collect();
    assert_eq!(
        unique.len(),
        titles.len(),
        "panel titles repeat: {titles:?}"
    );
}

/// The pickers at the top filter what they say: every sidecar query is limited to the chosen
/// namespaces, and a query broken down by destination or shard to the chosen ones.
#[test]
fn every_query_reads_and_honours_the_variables() {
    let d = dashboard();
    let qs = queries(&d);
    assert!(qs.len() >= 20, "{} queries", qs.len());
    let mut metrics = BTreeSet::new();
    for q in &qs {
        let uses = promql::uses(&q.expr).unwrap_or_else(|e| panic!("{}: {e}", q.source));
        assert!(
            !uses.is_empty(),
            "{}: {:?} reads no metric",
            q.source,
            q.expr
        );
        for u in uses {
            assert!(
                u.metric.starts_with("shardmesh_"),
                "{}: {}",
                q.source,
                u.metric
            );
            metrics.insert(u.metric.clone());
            let control_plane = u.metric.starts_with("shardmesh_operator_")
                || u.metric.starts_with("shardmesh_webhook_");
            let filters = |label: &str| {
                u.matchers
                    .iter()
                    .any(|(l, op, v)| l == label && op == "=~" && *v == format!("${label}"))
            };
            // A variable's own query may not filter by itself or by the ones listed after it.
            let own = q.source.strip_prefix("variable $");
            let order = ["namespace", "destination", "shard"];
            let before = |label: &str| match own {
                None => true,
                Some(v) => {
                    order.iter().position(|o| *o == label) < order.iter().position(|o| *o == v)
                }
            };
            if !control_plane && before("namespace") {
                assert!(
                    filters("namespace"),
                    "{}: {} ignores $namespace",
                    q.source,
                    u.metric
                );
            }
            for label in ["destination", "shard"] {
                if u.labels.contains(label) && before(label) {
                    assert!(
                        filters(label),
                        "{}: {} ignores ${label}",
                        q.source,
                        u.metric
                    );
                }
            }
        }
    }
    // Each issue item has a panel.
    for m in [
        "shardmesh_destination_requests_total",
        "shardmesh_destination_request_duration_seconds_bucket",
        "shardmesh_destination_retries_total",
        "shardmesh_destination_retry_budget_exhausted_total",
        "shardmesh_destination_breaker_transitions_total",
        "shardmesh_destination_map_epoch",
        "shardmesh_destination_members",
        "shardmesh_operator_reconciles_total",
        "shardmesh_operator_reconcile_errors_total",
        "shardmesh_operator_reconcile_duration_seconds_bucket",
        "shardmesh_webhook_admissions_total",
        "shardmesh_webhook_admission_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(m), "no panel shows {m}");
    }
}

/// The operator and webhook panels against the operator binary's own registry, without a
/// cluster (the e2e scenario below checks the running processes and the sidecar).
#[test]
fn control_plane_panels_match_the_operators_registry() {
    let m = shardmesh_operator::metrics::Metrics::default();
    m.reconciled("main", Duration::from_millis(3), Some("api_error"));
    m.admitted("validate", "answered", Duration::from_micros(40));
    m.set_leader(true);
    let mut e = Exports::default();
    e.add(&m.render())
        .expect("the operator's exposition parses");
    let control_plane: Vec<Query> = queries(&dashboard())
        .into_iter()
        .filter(|q| q.expr.contains("shardmesh_operator_") || q.expr.contains("shardmesh_webhook_"))
        .collect();
    assert!(control_plane.len() >= 8, "{control_plane:?}");
    let problems = missing(&control_plane, &e);
    assert!(problems.is_empty(), "{problems:#?}");
}

// ---------------------------------------------------------------------------------------------
// On the cluster.

/// GET `http://<addr><path>` from the test process (inside the cluster's network namespace),
/// bounded so a pod that just went away cannot stall a wait.
async fn get(http: &mesh::Http, addr: &str, path: &str) -> anyhow::Result<String> {
    let uri: http::Uri = format!("http://{addr}{path}").parse()?;
    let fetch = async {
        let resp = http.get(uri).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::ensure!(status.is_success(), "GET http://{addr}{path}: {status}");
        anyhow::Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .map_err(|_| anyhow::anyhow!("GET http://{addr}{path}: no answer in 5s"))?
}

fn pod_ip(p: &Pod) -> Option<String> {
    p.status.as_ref()?.pod_ip.clone()
}

/// Whether the scrape has a sample line of `metric` (any labels).
fn has_sample(text: &str, metric: &str) -> bool {
    text.lines().any(|l| {
        l.strip_prefix(metric)
            .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
    })
}

/// The sum of the values of the samples of `series` (a name, or a name with its labels).
fn sample_sum(text: &str, series: &str) -> f64 {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(series)?;
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return None;
            }
            rest.split_whitespace().last()?.parse::<f64>().ok()
        })
        .sum()
}

/// The leading controller's pod and its `/metrics`, once that pod answers as the leader (the
/// failover scenario may move the Lease meanwhile: the holder is looked up each time).
async fn leader_metrics(
    http: &mesh::Http,
    system: &Api<Pod>,
    leases: &Api<Lease>,
) -> anyhow::Result<Option<(String, String)>> {
    let lease = leases.get(shardmesh_e2e::OPERATOR_LEASE).await?;
    let holder = lease
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default();
    let Some(ip) = system.get_opt(&holder).await?.as_ref().and_then(pod_ip) else {
        return Ok(None);
    };
    let t = get(http, &format!("{ip}:8080"), "/metrics").await?;
    Ok((sample_sum(&t, "shardmesh_operator_leader") == 1.0).then_some((holder, t)))
}

/// Failed reconciles a controller counted, all reasons.
fn reconcile_errors(text: &str) -> f64 {
    sample_sum(text, "shardmesh_operator_reconcile_errors_total")
}

#[tokio::test]
#[ignore = "e2e: needs the real cluster; run e2e/test.sh"]
async fn every_metric_a_panel_queries_is_exported() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "dashboard").await;
    let injected = mesh::injection_installed(&client).await;
    let svcs: Api<ShardedService> = ns.api();

    // A 2x1 demo service the client routes to.
    let mut body = demo_service("demo", 2, 1);
    mesh::add_sidecar_if_not_injected(&mut body, injected, &[]);
    apply_service(&svcs, &body).await.expect("apply demo");
    let http = mesh::http();
    let system: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let (leader, before) = wait_for("the leading controller's /metrics", WAIT, || {
        leader_metrics(&http, &system, &leases)
    })
    .await;
    let errors_before = reconcile_errors(&before);
    // A service whose StatefulSet the API server refuses (a quota of no StatefulSets in a
    // namespace of its own): every leader counts failed reconciles of it, so the errors panel's
    // series exist even on an operator that has not failed before.
    let quota_ns = TestNamespace::create(&client, "dashquota").await;
    let quotas: Api<ResourceQuota> = quota_ns.api();
    quotas
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "no-statefulsets"},
                "spec": {"hard": {"count/statefulsets.apps": "0"}},
            }))
            .expect("quota literal"),
        )
        .await
        .expect("create the quota");
    apply_service(&quota_ns.api(), &demo_service("refused", 1, 1))
        .await
        .expect("apply refused");

    let slices: Api<ShardMapSlice> = ns.api();
    wait_for("the demo's map lists a member per shard", WAIT, || async {
        let m: ShardMap = mesh::shard_map(&slices, "demo").await?;
        if m.shards.len() == 2 && m.shards.iter().all(|s| !s.members.is_empty()) {
            Ok(Some(()))
        } else {
            Err(anyhow::anyhow!(
                "epoch {} members {:?}",
                m.epoch,
                mesh::members(&m)
            ))
        }
    })
    .await;
    let proxy = mesh::start_client(&ns, "demo", &http).await;
    let host = format!("demo.{}:8080", ns.name);
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for i in 0..40 {
        let method = if i % 2 == 0 { "PUT" } else { "GET" };
        let s = mesh::keyed(&http, proxy, &host, method, &format!("key-{}", i / 2))
            .await
            .map_or(0, |r| r.status);
        *statuses.entry(s).or_default() += 1;
    }
    eprintln!("[e2e] keyed requests through the client sidecar: {statuses:?}");
    assert!(
        statuses.keys().any(|s| (200..300).contains(s)),
        "no request was routed: {statuses:?}"
    );

    // The client sidecar, once its counters hold the traffic.
    let pods: Api<Pod> = ns.api();
    let client_ip = pod_ip(&pods.get("client").await.expect("client pod")).expect("client IP");
    let admin = format!("{client_ip}:{}", ports::SIDECAR_ADMIN);
    let sidecar = wait_for(
        "the client sidecar's /metrics count the traffic",
        WAIT,
        || async {
            let t = get(&http, &admin, "/metrics").await?;
            let outbound = sample_sum(
                &t,
                "shardmesh_requests_total{direction=\"outbound\",status_class=\"2xx\"}",
            );
            Ok((outbound >= 1.0).then_some(t))
        },
    )
    .await;

    // The leading controller, once it has counted a failed reconcile (of `refused`; a new
    // leader starts from 0).
    let operator = wait_for(
        "the leading controller counts a failed reconcile",
        WAIT,
        || async {
            let Some((holder, t)) = leader_metrics(&http, &system, &leases).await? else {
                return Ok(None);
            };
            let errors = reconcile_errors(&t);
            let baseline = if holder == leader { errors_before } else { 0.0 };
            if errors > baseline {
                Ok(Some(t))
            } else {
                Err(anyhow::anyhow!(
                    "{holder}: {errors} reconcile errors, {baseline} before `refused`"
                ))
            }
        },
    )
    .await;

    // Every webhook replica (the creates above went through validation and injection).
    let webhook = wait_for(
        "the webhook replicas' /metrics with admissions",
        WAIT,
        || async {
            let list = system
                .list(&ListParams::default().labels("app.kubernetes.io/component=webhook"))
                .await?;
            let mut all = String::new();
            // Ready replicas: one still starting (or going away) has no listener.
            let ready = |p: &&Pod| {
                p.metadata.deletion_timestamp.is_none()
                    && p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|cs| {
                            cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        })
            };
            for p in list.items.iter().filter(ready) {
                let Some(ip) = pod_ip(p) else { continue };
                all.push_str(&get(&http, &format!("{ip}:8081"), "/metrics").await?);
            }
            Ok(has_sample(&all, "shardmesh_webhook_admissions_total").then_some(all))
        },
    )
    .await;

    let scrapes = [
        ("operator", &operator),
        ("webhook", &webhook),
        ("sidecar", &sidecar),
    ];
    let mut exports = Exports::default();
    let mut artifact = String::new();
    for (what, text) in scrapes {
        exports
            .add(text)
            .unwrap_or_else(|e| panic!("the {what}'s /metrics does not parse: {e}"));
        artifact.push_str(&format!("### {what}\n{text}\n"));
    }
    if let Ok(Some(path)) = write_artifact("dashboard-scrapes.txt", &artifact) {
        eprintln!("[e2e] scrapes written to {}", path.display());
    }

    // Report by component, so a failure says whose metrics drifted.
    let all = queries(&dashboard());
    let component = |q: &Query| {
        if q.expr.contains("shardmesh_operator_") {
            "operator"
        } else if q.expr.contains("shardmesh_webhook_") {
            "webhook"
        } else {
            "sidecar"
        }
    };
    let mut problems = Vec::new();
    for (what, _) in scrapes {
        let mine: Vec<Query> = all
            .iter()
            .filter(|q| component(q) == what)
            .map(|q| Query {
                source: q.source.clone(),
                expr: q.expr.clone(),
            })
            .collect();
        let found = missing(&mine, &exports);
        eprintln!(
            "[e2e] {what} panels: {} queries, {} problems",
            mine.len(),
            found.len()
        );
        for p in &found {
            eprintln!("[e2e]   {p}");
        }
        problems.extend(found);
    }
    assert!(
        problems.is_empty(),
        "the dashboard queries what no running component exports:\n{}",
        problems.join("\n")
    );
    ns.delete().await;
    quota_ns.delete().await;
}
