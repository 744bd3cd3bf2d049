//! Output: every command builds one serializable report; `-o json|yaml` prints it as is, the
//! default prints it as text with aligned tables, like kubectl.

use serde::Serialize;

use crate::error::Error;

/// `-o/--output`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    #[default]
    Table,
    /// The report as JSON, for scripts (`jq`).
    Json,
    /// The report as YAML.
    Yaml,
}

/// A report that can also print itself for people.
pub trait Report: Serialize {
    /// The text form.
    fn text(&self) -> String;
}

/// The report in `format`, ending with a newline.
pub fn render<R: Report>(report: &R, format: Format) -> Result<String, Error> {
    match format {
        Format::Table => Ok(report.text()),
        Format::Json => serde_json::to_string_pretty(report)
            .map(|s| s + "\n")
            .map_err(|e| Error::Encode(e.to_string())),
        Format::Yaml => serde_yaml::to_string(report).map_err(|e| Error::Encode(e.to_string())),
    }
}

/// Columns with upper-case headers separated by three spaces, as `kubectl get` prints them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_uppercase()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells print empty, extra cells are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells = cells;
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    /// The aligned text, one line per row, no trailing spaces.
    pub fn render(&self) -> String {
        let width = |i: usize| {
            std::iter::once(&self.headers[i])
                .chain(self.rows.iter().map(|r| &r[i]))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..self.headers.len()).map(width).collect();
        let mut out = String::new();
        for line in std::iter::once(&self.headers).chain(self.rows.iter()) {
            let mut text = String::new();
            for (i, cell) in line.iter().enumerate() {
                if i > 0 {
                    text.push_str("   ");
                }
                text.push_str(cell);
                let pad = widths[i].saturating_sub(cell.chars().count());
                text.extend(std::iter::repeat_n(' ', pad));
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// One `Key:       value` line of a report's header, keys aligned as `kubectl describe` does.
pub fn field(out: &mut String, key: &str, value: impl std::fmt::Display) {
    out.push_str(&format!("{key:<12}{value}\n"));
}

/// `-` for an absent value, as kubectl prints `<none>` more briefly.
pub fn or_dash(v: Option<impl ToString>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_on_the_widest_cell_without_trailing_spaces() {
        let mut t = Table::new(&["shard", "members", "leader"]);
        t.row(vec!["0".into(), "a-0-0,a-0-1".into(), "a-0-1".into()]);
        t.row(vec!["10".into(), "".into()]);
        assert_eq!(
            t.render(),
            "SHARD   MEMBERS       LEADER\n\
             0       a-0-0,a-0-1   a-0-1\n\
             10\n"
        );
    }

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Demo {
        shard_count: u32,
    }

    impl Report for Demo {
        fn text(&self) -> String {
            format!("{} shards\n", self.shard_count)
        }
    }

    #[test]
    fn json_and_yaml_carry_the_same_fields_as_the_text() {
        let d = Demo { shard_count: 3 };
        assert_eq!(render(&d, Format::Table).unwrap(), "3 shards\n");
        assert_eq!(
            render(&d, Format::Json).unwrap(),
            "{\n  \"shardCount\": 3\n}\n"
        );
        assert_eq!(render(&d, Format::Yaml).unwrap(), "shardCount: 3\n");
        assert_eq!(or_dash(None::<u32>), "-");
        let mut out = String::new();
        field(&mut out, "Shards:", 3);
        assert_eq!(out, "Shards:     3\n");
        assert_eq!(or_dash(Some(4)), "4");
    }
}
