//! A strict reader of the Prometheus text exposition format (version 0.0.4), for tests that
//! scrape the agent and mesh-ctrl. Where Prometheus itself would refuse a scrape, or a lenient
//! parser would guess, this one fails with the line and the reason: malformed lines, bad names,
//! bad label escaping, duplicate labels or series, a TYPE or HELP given twice or after the
//! family's samples, a family whose lines are not grouped, a sample whose name does not fit its
//! family's type (`_bucket` of a counter), a negative counter.

use std::collections::{BTreeMap, BTreeSet};

/// A metric family's type, from its `# TYPE` line (`untyped` without one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `counter`
    Counter,
    /// `gauge`
    Gauge,
    /// `histogram`
    Histogram,
    /// `summary`
    Summary,
    /// `untyped`, or no TYPE line.
    Untyped,
}

impl Kind {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "counter" => Kind::Counter,
            "gauge" => Kind::Gauge,
            "histogram" => Kind::Histogram,
            "summary" => Kind::Summary,
            "untyped" => Kind::Untyped,
            _ => return None,
        })
    }

    /// The name this type has in a TYPE line.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
            Kind::Summary => "summary",
            Kind::Untyped => "untyped",
        }
    }
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's own name (`x_sum` for the sum of summary `x`).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// A metric family: its metadata and samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// The family name.
    pub name: String,
    /// Its type.
    pub kind: Kind,
    /// Its HELP text, unescaped.
    pub help: Option<String>,
    /// Its samples, in order.
    pub samples: Vec<Sample>,
}

/// A whole scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    /// Families by name.
    pub families: BTreeMap<String, Family>,
}

/// Why a scrape was refused: the 1-based line and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
}

/// Unescapes `\\`, `\n` and (in label values) `\"`; any other escape is an error.
fn unescape(text: &str, quote: bool) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('"') if quote => out.push('"'),
            other => return Err(format!("invalid escape \\{}", other.map(String::from).unwrap_or_default())),
        }
    }
    Ok(out)
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" => return Ok(f64::INFINITY),
        "-Inf" => return Ok(f64::NEG_INFINITY),
        "NaN" => return Ok(f64::NAN),
        _ => {}
    }
    // Only the characters of a decimal float: Rust's parser would also take "inf" or "nan".
    if text.is_empty() || !text.chars().all(|c| c.is_ascii_digit() || ".eE+-".contains(c)) {
        return Err(format!("invalid value {text:?}"));
    }
    text.parse().map_err(|_| format!("invalid value {text:?}"))
}

/// Parses `{a="1",b="2"}` at the start of `text`; returns the labels and the rest.
fn parse_labels(text: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = text.strip_prefix('{').expect("called on '{'");
    loop {
        rest = rest.trim_start_matches(' ');
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (name, after) = rest.split_once('=').ok_or("label without '='")?;
        let name = name.trim_end_matches(' ');
        if !is_label_name(name) {
            return Err(format!("invalid label name {name:?}"));
        }
        let after = after.trim_start_matches(' ').strip_prefix('"').ok_or(format!("label {name}: value not quoted"))?;
        // The value ends at the first quote not escaped by a backslash.
        let mut end = None;
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        let end = end.ok_or(format!("label {name}: unterminated value"))?;
        let value = unescape(&after[..end], true).map_err(|e| format!("label {name}: {e}"))?;
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} given twice"));
        }
        rest = after[end + 1..].trim_start_matches(' ');
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err(format!("expected ',' or '}}' after label {name}"));
        }
    }
}

/// The family a sample named `name` belongs to, given the families declared so far: `x` for
/// `x_sum`/`x_count` (and `x_bucket`) when `x` is a declared summary (histogram).
fn family_of(name: &str, declared: &BTreeMap<String, Family>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            let kind = declared.get(base).map(|f| f.kind);
            let fits = match suffix {
                "_bucket" => kind == Some(Kind::Histogram),
                _ => matches!(kind, Some(Kind::Histogram | Kind::Summary)),
            };
            if fits {
                return base.to_string();
            }
        }
    }
    name.to_string()
}

/// Parses a whole scrape, refusing anything Prometheus would refuse or that is ambiguous.
pub fn parse(text: &str) -> Result<Exposition, ParseError> {
    let mut out = Exposition::default();
    // Families whose samples have started, and the one being read: a family's lines are one group.
    let mut closed = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut series = BTreeSet::new();
    if !text.is_empty() && !text.ends_with('\n') {
        return Err(ParseError { line: text.lines().count(), message: "the last line has no newline".into() });
    }
    for (i, line) in text.lines().enumerate() {
        let fail = |message: String| ParseError { line: i + 1, message };
        // Moves the reader to `family`, refusing to come back to a family already left.
        let mut enter = |family: &str, current: &mut Option<String>| -> Result<(), ParseError> {
            if current.as_deref() != Some(family) {
                if closed.contains(family) {
                    return Err(fail(format!("the lines of {family} are not grouped together")));
                }
                if let Some(previous) = current.take() {
                    closed.insert(previous);
                }
                *current = Some(family.to_string());
            }
            Ok(())
        };
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let words: Vec<&str> = comment.trim_start_matches(' ').splitn(3, ' ').collect();
            let (keyword, name) = (words[0], words.get(1).copied().unwrap_or(""));
            if keyword != "HELP" && keyword != "TYPE" {
                continue;
            }
            if !is_metric_name(name) {
                return Err(fail(format!("{keyword} for invalid metric name {name:?}")));
            }
            let rest = words.get(2).copied().unwrap_or("");
            enter(name, &mut current)?;
            let family = out.families.entry(name.to_string()).or_insert_with(|| Family {
                name: name.to_string(),
                kind: Kind::Untyped,
                help: None,
                samples: Vec::new(),
            });
            if !family.samples.is_empty() {
                return Err(fail(format!("{keyword} of {name} after its samples")));
            }
            if keyword == "HELP" {
                if family.help.is_some() {
                    return Err(fail(format!("second HELP for {name}")));
                }
                family.help = Some(unescape(rest, false).map_err(|e| fail(format!("HELP of {name}: {e}")))?);
            } else {
                if family.kind != Kind::Untyped || rest.is_empty() {
                    return Err(fail(format!("second or empty TYPE for {name}")));
                }
                family.kind = Kind::parse(rest).ok_or_else(|| fail(format!("unknown type {rest:?} for {name}")))?;
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| fail("a sample without a value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(fail(format!("invalid metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(|e| fail(format!("{name}: {e}")))?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let fields: Vec<&str> = rest.split(' ').filter(|f| !f.is_empty()).collect();
        if !rest.starts_with(' ') || fields.is_empty() || fields.len() > 2 {
            return Err(fail(format!("{name}: expected ' VALUE [TIMESTAMP]' after the name and labels")));
        }
        let value = parse_value(fields[0]).map_err(|e| fail(format!("{name}: {e}")))?;
        if let Some(ts) = fields.get(1) {
            ts.parse::<i64>().map_err(|_| fail(format!("{name}: invalid timestamp {ts:?}")))?;
        }
        let family_name = family_of(name, &out.families);
        enter(&family_name, &mut current)?;
        let family = out.families.entry(family_name.clone()).or_insert_with(|| Family {
            name: family_name.clone(),
            kind: Kind::Untyped,
            help: None,
            samples: Vec::new(),
        });
        let suffix = &name[family_name.len()..];
        match (family.kind, suffix) {
            (Kind::Counter, "") if value.is_nan() || value < 0.0 => {
                return Err(fail(format!("counter {name} has value {value}")));
            }
            (Kind::Summary, "") if !labels.contains_key("quantile") => {
                return Err(fail(format!("summary sample {name} without a quantile label")));
            }
            (Kind::Histogram, "_bucket") if !labels.contains_key("le") => {
                return Err(fail(format!("histogram bucket {name} without an le label")));
            }
            (Kind::Histogram, "") => return Err(fail(format!("histogram {name} has a bare sample"))),
            _ => {}
        }
        if !series.insert((name.to_string(), labels.clone())) {
            return Err(fail(format!("duplicate series {name}{labels:?}")));
        }
        family.samples.push(Sample { name: name.to_string(), labels, value });
    }
    if let Some(empty) = out.families.values().find(|f| f.samples.is_empty()) {
        return Err(ParseError {
            line: text.lines().count(),
            message: format!("{} has HELP or TYPE but no sample", empty.name),
        });
    }
    Ok(out)
}

impl Exposition {
    /// The family `name`, if the scrape has it.
    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.get(name)
    }

    /// Sum of the samples named `name` whose labels include every pair of `labels`; panics
    /// when no sample has that name (a missing metric is never zero).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let samples: Vec<&Sample> =
            self.families.values().flat_map(|f| &f.samples).filter(|s| s.name == name).collect();
        assert!(!samples.is_empty(), "the scrape has no sample named {name}");
        samples
            .iter()
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .map(|s| s.value)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "# HELP a_total Things, with a \\\\ and a \\n.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\\\\\\n\"} 3\na_total{x=\"2\"} 0 1700000000000\n# TYPE g gauge\ng -1.5e3\n# TYPE s summary\ns{quantile=\"0.5\"} NaN\ns_sum 2\ns_count 1\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\nuntyped_one{a=\"b\",} +Inf\n";

    #[test]
    fn a_well_formed_scrape_parses_with_escapes_types_and_families() {
        let e = parse(GOOD).unwrap();
        let a = e.family("a_total").unwrap();
        assert_eq!((a.kind, a.help.as_deref()), (Kind::Counter, Some("Things, with a \\ and a \n.")));
        assert_eq!(a.samples[0].labels["y"], "q\"\\\n");
        assert_eq!(e.family("s").unwrap().samples.len(), 3);
        assert_eq!(e.family("h").unwrap().kind, Kind::Histogram);
        assert_eq!(e.family("untyped_one").unwrap().kind, Kind::Untyped);
        assert_eq!(e.sum("a_total", &[]), 3.0);
        assert_eq!(e.sum("a_total", &[("x", "2")]), 0.0);
        assert_eq!(e.sum("g", &[]), -1500.0);
    }

    #[test]
    #[should_panic(expected = "no sample named missing_total")]
    fn a_missing_metric_is_never_zero() {
        parse(GOOD).unwrap().sum("missing_total", &[]);
    }

    #[test]
    fn malformed_scrapes_are_refused_with_the_line_and_reason() {
        let cases: &[(&str, &str)] = &[
            ("a 1", "no newline"),
            ("a\n", "without a value"),
            ("a{x=\"1\"}\n", "expected ' VALUE"),
            ("a 1 2 3\n", "expected ' VALUE"),
            ("a one\n", "invalid value"),
            ("a inf\n", "invalid value"),
            ("a 1 12.5\n", "invalid timestamp"),
            ("1a 1\n", "invalid metric name"),
            ("a-b 1\n", "invalid metric name"),
            ("a{x=1} 1\n", "not quoted"),
            ("a{x=\"1} 1\n", "unterminated"),
            ("a{x=\"\\t\"} 1\n", "invalid escape"),
            ("a{x=\"1\" y=\"2\"} 1\n", "expected ','"),
            ("a{x=\"1\",x=\"2\"} 1\n", "given twice"),
            ("a{__x=\"1\"} 1\n", "invalid label name"),
            ("a{1x=\"1\"} 1\n", "invalid label name"),
            ("a{x=\"1\"} 1\na{x=\"1\"} 2\n", "duplicate series"),
            ("a 1\nb 1\na{x=\"2\"} 1\n", "not grouped"),
            ("# TYPE a counter\n# TYPE a counter\na 1\n", "second or empty TYPE"),
            ("# TYPE a\na 1\n", "second or empty TYPE"),
            ("# TYPE a countr\na 1\n", "unknown type"),
            ("# HELP a x\n# HELP a y\na 1\n", "second HELP"),
            ("# HELP a bad \\q\na 1\n", "invalid escape"),
            ("a 1\n# TYPE a counter\n", "after its samples"),
            ("# TYPE a counter\na -1\n", "counter a has value -1"),
            ("# TYPE a counter\n", "no sample"),
            ("# TYPE 9a counter\n9a 1\n", "invalid metric name"),
            ("# TYPE s summary\ns 1\n", "without a quantile"),
            ("# TYPE h histogram\nh_bucket 1\n", "without an le"),
            ("# TYPE h histogram\nh 1\n", "bare sample"),
        ];
        for (text, reason) in cases {
            let err = parse(text).expect_err(text);
            assert!(err.message.contains(reason), "{text:?}: {err} (expected {reason:?})");
        }
    }
}
