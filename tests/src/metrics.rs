//! A server's `/metrics`, parsed by a real OpenMetrics parser (prometheus-client's, from PyPI,
//! through `tests/tools/openmetrics.py`), and the metric names its operator docs list.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::http_get;

/// One scrape: every family and sample the parser read.
#[derive(Debug, Clone)]
pub struct Scrape {
    families: Vec<Value>,
}

impl Scrape {
    /// GETs `http`'s `/metrics` (`http://HOST:PORT`) and parses it; panics (failing the test)
    /// if it does not answer 200 or is not valid OpenMetrics.
    pub fn of(http: &str) -> Scrape {
        let (status, body) = http_get(http, "/metrics").expect("GET /metrics");
        assert_eq!(status, 200, "/metrics answered {status}: {body}");
        Scrape::parse(&body)
    }

    /// Parses an exposition with the real parser.
    pub fn parse(text: &str) -> Scrape {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/openmetrics.py");
        let mut parser = Command::new("python3")
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run python3 tests/tools/openmetrics.py (./tests/run installs prometheus-client)");
        parser.stdin.take().expect("stdin is piped").write_all(text.as_bytes()).expect("write the exposition");
        let out = parser.wait_with_output().expect("the parser ends");
        assert!(out.status.success(), "{}\n---\n{text}", String::from_utf8_lossy(&out.stderr));
        let families: Vec<Value> = serde_json::from_slice(&out.stdout).expect("the parser prints JSON");
        Scrape { families }
    }

    /// Every family and sample name (`x`, `x_total`, `x_bucket`, ...).
    pub fn names(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for family in &self.families {
            names.insert(family["name"].as_str().unwrap_or_default().to_string());
            for sample in family["samples"].as_array().into_iter().flatten() {
                names.insert(sample["name"].as_str().unwrap_or_default().to_string());
            }
        }
        names
    }

    /// The family's type (`counter`, `gauge`, `histogram`, `info`).
    pub fn type_of(&self, family: &str) -> Option<String> {
        self.families.iter().find(|f| f["name"] == family).and_then(|f| f["type"].as_str().map(str::to_string))
    }

    /// The sum of the samples named `sample` whose labels include every one of `labels`
    /// (0 if there are none).
    pub fn sum(&self, sample: &str, labels: &[(&str, &str)]) -> f64 {
        self.families
            .iter()
            .flat_map(|f| f["samples"].as_array().into_iter().flatten())
            .filter(|s| s["name"] == sample)
            .filter(|s| labels.iter().all(|(k, v)| s["labels"][*k] == *v))
            .map(|s| s["value"].as_f64().unwrap_or(0.0))
            .sum()
    }
}

/// The metric names (`prefix…`) a doc mentions, in the order of the doc, each once.
pub fn documented_metrics(doc: &Path, prefix: &str) -> Vec<String> {
    let text = std::fs::read_to_string(doc).unwrap_or_else(|e| panic!("{}: {e}", doc.display()));
    let mut seen = BTreeSet::new();
    let mut names = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find(prefix) {
        let name: String =
            rest[at..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        rest = &rest[at + name.len().max(1)..];
        if name.len() > prefix.len() && seen.insert(name.clone()) {
            names.push(name);
        }
    }
    names
}
