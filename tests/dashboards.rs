//! The monitoring files shipped in packaging/: the Prometheus alert rules
//! (`packaging/prometheus/offloadd-alerts.yml`) and the Grafana dashboard
//! (`packaging/grafana/offloadd.json`).
//!
//! * `promtool check rules` accepts the rules, and every PromQL expression of
//!   the dashboard (its Grafana variables replaced);
//! * `promtool test rules` shows each alert firing on series that should fire
//!   it, after its `for:`, and staying quiet on a healthy daemon;
//! * every metric either file queries is served by a real daemon's
//!   `/metrics` (real s3s-fs, one file uploaded so the success series
//!   exist), and each file uses at least the metrics the issue asks for;
//! * the dashboard is importable (data source input and variable, `instance`
//!   variable, unique ids) and README.md lists every alert.

mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

const ALERTS: &str = "packaging/prometheus/offloadd-alerts.yml";
const DASHBOARD: &str = "packaging/grafana/offloadd.json";

/// The alerts the issue asks for.
const ALERT_NAMES: &[&str] = &[
    "OffloaddDown",
    "OffloaddBacklogGrowing",
    "OffloaddNoRecentUpload",
    "OffloaddProviderPaused",
    "OffloaddParkedItems",
    "OffloaddUploadErrorsHigh",
    "OffloaddStateDirNearlyFull",
    "OffloaddRootUnavailable",
    "OffloaddPipelinePaused",
];

/// The metrics the issue says alerts need (families; as scraped).
const ALERT_METRICS: &[&str] = &[
    "offloadd_oldest_pending_age_seconds",
    "offloadd_failed_items",
    "offloadd_last_success_age_seconds",
    "offloadd_provider_paused",
    "offloadd_state_dir_free_bytes",
    "offloadd_root_available",
];

/// Every metric the daemon serves; the dashboard shows each of them (a
/// histogram by its base name).
const DASHBOARD_METRICS: &[&str] = &[
    "offloadd_queue_depth",
    "offloadd_in_flight",
    "offloadd_uploads_total",
    "offloadd_uploaded_bytes_total",
    "offloadd_upload_duration_seconds",
    "offloadd_failed_items",
    "offloadd_retries_total",
    "offloadd_paused_providers",
    "offloadd_last_success_timestamp_seconds",
    "offloadd_rescans_total",
    "offloadd_oldest_pending_age_seconds",
    "offloadd_last_success_age_seconds",
    "offloadd_provider_paused",
    "offloadd_pipeline_paused",
    "offloadd_root_available",
    "offloadd_state_dir_free_bytes",
    "offloadd_waiting_for_writer",
    "offloadd_bandwidth_limit_bytes_per_second",
];

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let p = crate_dir().join(rel);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn have_promtool() -> bool {
    Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `promtool ARGS`; panics with its output unless it succeeds.
fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(crate_dir())
        .output()
        .expect("run promtool");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

// ---------------------------------------------------------------------------
// PromQL: the metric names an expression queries

fn ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

/// The `offloadd_*` metric names a PromQL expression (or a Grafana query
/// such as `label_values(m, instance)`) refers to. A small lexer: string
/// literals (label values, including `"$instance"`), comments, numbers and
/// durations, and Grafana variables (`$x`, `${x}`) are skipped; every other
/// identifier starting with `offloadd_` is a metric name.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let b = expr.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\'' || c == b'`' {
            i += 1;
            while i < b.len() && b[i] != c {
                if b[i] == b'\\' && c != b'`' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else if c == b'#' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'$' {
            i += 1;
            if b.get(i) == Some(&b'{') {
                while i < b.len() && b[i] != b'}' {
                    i += 1;
                }
                i += 1;
            } else {
                while i < b.len() && ident_char(b[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_') {
                i += 1;
            }
        } else if ident_start(c) {
            let s = i;
            while i < b.len() && ident_char(b[i]) {
                i += 1;
            }
            if expr[s..i].starts_with("offloadd_") {
                out.insert(expr[s..i].to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

// ---------------------------------------------------------------------------
// the scrape

/// What a `/metrics` text serves: sample names, and each family's type.
struct Scrape {
    samples: BTreeSet<String>,
    types: BTreeMap<String, String>,
}

fn parse_scrape(text: &str) -> Scrape {
    let mut samples = BTreeSet::new();
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut w = rest.split_whitespace();
            if let (Some(name), Some(ty)) = (w.next(), w.next()) {
                types.insert(name.to_string(), ty.to_string());
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            samples.insert(line[..end].to_string());
        }
    }
    Scrape { samples, types }
}

const HISTOGRAM_SUFFIXES: &[&str] = &["_bucket", "_sum", "_count"];

impl Scrape {
    /// The family a queried name belongs to: a histogram's `_bucket`,
    /// `_sum` and `_count` series count as the histogram's base name.
    fn family(&self, name: &str) -> String {
        for suffix in HISTOGRAM_SUFFIXES {
            if let Some(base) = name.strip_suffix(suffix) {
                if self.types.get(base).map(String::as_str) == Some("histogram") {
                    return base.to_string();
                }
            }
        }
        name.to_string()
    }

    /// Why `name` cannot be queried from this scrape, if it cannot.
    fn problem(&self, name: &str) -> Option<String> {
        if self.types.get(name).map(String::as_str) == Some("histogram") {
            return Some(format!(
                "{name} is a histogram: Prometheus stores {name}_bucket, {name}_sum and {name}_count, not {name}"
            ));
        }
        if !self.samples.contains(name) {
            return Some(format!("{name} is not served by /metrics"));
        }
        if let Some(base) = name.strip_suffix("_bucket") {
            if self.types.get(base).map(String::as_str) != Some("histogram") {
                return Some(format!("{name} is served but {base} is not a histogram"));
            }
        }
        None
    }

    /// One line per (where, name) that the scrape does not serve.
    fn unserved(&self, exprs: &[(String, String)]) -> Vec<String> {
        let mut out = Vec::new();
        for (place, expr) in exprs {
            for name in metric_names(expr) {
                if let Some(p) = self.problem(&name) {
                    out.push(format!("{place}: {p}"));
                }
            }
        }
        out
    }

    /// The families that `exprs` query, together.
    fn families(&self, exprs: &[(String, String)]) -> BTreeSet<String> {
        exprs
            .iter()
            .flat_map(|(_, e)| metric_names(e))
            .map(|n| self.family(&n))
            .collect()
    }
}

// ---------------------------------------------------------------------------
// the two files

struct Rule {
    alert: String,
    expr: String,
    for_: Option<String>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

fn yaml_str(v: &Yaml, key: &str) -> Option<String> {
    v.get(key).and_then(Yaml::as_str).map(str::to_string)
}

fn yaml_map(v: &Yaml, key: &str) -> BTreeMap<String, String> {
    v.get(key)
        .and_then(Yaml::as_mapping)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn alert_rules() -> Vec<Rule> {
    let doc: Yaml = serde_yaml::from_str(&read(ALERTS)).expect("alert rules are YAML");
    let groups = doc
        .get("groups")
        .and_then(Yaml::as_sequence)
        .expect("groups: [...]");
    let mut rules = Vec::new();
    for g in groups {
        for r in g
            .get("rules")
            .and_then(Yaml::as_sequence)
            .expect("each group has rules")
        {
            rules.push(Rule {
                alert: yaml_str(r, "alert").expect("only alerting rules"),
                expr: yaml_str(r, "expr").expect("each rule has an expr"),
                for_: yaml_str(r, "for"),
                labels: yaml_map(r, "labels"),
                annotations: yaml_map(r, "annotations"),
            });
        }
    }
    rules
}

/// (where, PromQL) for every expression of the alert rules.
fn alert_exprs() -> Vec<(String, String)> {
    alert_rules()
        .into_iter()
        .map(|r| (format!("{ALERTS}: alert {}", r.alert), r.expr))
        .collect()
}

fn dashboard() -> Json {
    serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON")
}

/// Every panel, rows' nested panels included.
fn panels(d: &Json) -> Vec<&Json> {
    fn walk<'a>(list: &'a Json, out: &mut Vec<&'a Json>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            if let Some(nested) = p.get("panels") {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    out
}

/// (where, PromQL) for every panel target of the dashboard.
fn dashboard_exprs(d: &Json) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((
                    format!(
                        "{DASHBOARD}: panel {} {:?} target {}",
                        p["id"],
                        p["title"].as_str().unwrap_or(""),
                        t["refId"].as_str().unwrap_or("?")
                    ),
                    e.to_string(),
                ));
            }
        }
    }
    out
}

/// (where, query) for the templating variables' queries.
fn variable_queries(d: &Json) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"].as_str().or(v["query"].as_str());
        for q in q.into_iter().chain(v["definition"].as_str()) {
            out.push((
                format!("{DASHBOARD}: variable {}", v["name"]),
                q.to_string(),
            ));
        }
    }
    out
}

/// A dashboard expression as Prometheus would receive it from Grafana.
fn expand_grafana_variables(expr: &str) -> String {
    let e = expr
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("${instance}", ".*")
        .replace("$instance", ".*");
    assert!(!e.contains('$'), "unknown Grafana variable in {expr}");
    e
}

// ---------------------------------------------------------------------------
// tests without a daemon

#[test]
fn metric_extraction_reports_unknown_names() {
    let names = metric_names(
        "sum by (result) (rate(offloadd_uploads_total{instance=~\"$instance\", job=\"offloadd_not_a_metric\"}[$__rate_interval]))\n\
         # offloadd_in_a_comment\n\
         / on(instance) offloadd_does_not_exist > 1e9 and offloadd_queue_depth offset 5m\n\
         + histogram_quantile(0.99, rate(offloadd_upload_duration_seconds_bucket[${__range}]))",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        [
            "offloadd_does_not_exist",
            "offloadd_queue_depth",
            "offloadd_upload_duration_seconds_bucket",
            "offloadd_uploads_total",
        ]
    );
    let scrape = parse_scrape(
        "# TYPE offloadd_queue_depth gauge\noffloadd_queue_depth 0\n\
         # TYPE offloadd_uploads counter\noffloadd_uploads_total{result=\"success\"} 1\n\
         # TYPE offloadd_upload_duration_seconds histogram\n\
         offloadd_upload_duration_seconds_sum 0.5\noffloadd_upload_duration_seconds_count 1\n\
         offloadd_upload_duration_seconds_bucket{le=\"+Inf\"} 1\n# EOF\n",
    );
    let exprs = |e: &str| vec![("test".to_string(), e.to_string())];
    assert!(scrape
        .unserved(&exprs(
            "rate(offloadd_uploads_total[5m]) + offloadd_queue_depth"
        ))
        .is_empty());
    let missing = scrape.unserved(&exprs(
        "offloadd_queue_depth > 0 and offloadd_does_not_exist",
    ));
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert!(
        missing[0].contains("offloadd_does_not_exist is not served"),
        "{missing:?}"
    );
    // A histogram is queried through its series, never by its base name.
    let missing = scrape.unserved(&exprs("rate(offloadd_upload_duration_seconds[5m])"));
    assert!(
        missing.len() == 1 && missing[0].contains("is a histogram"),
        "{missing:?}"
    );
    let missing = scrape.unserved(&exprs("offloadd_queue_depth_bucket"));
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert_eq!(
        scrape.family("offloadd_upload_duration_seconds_bucket"),
        "offloadd_upload_duration_seconds"
    );
    assert_eq!(
        scrape.family("offloadd_uploads_total"),
        "offloadd_uploads_total"
    );
}

#[test]
fn alert_rules_are_complete() {
    let rules = alert_rules();
    let names: BTreeSet<&str> = rules.iter().map(|r| r.alert.as_str()).collect();
    for want in ALERT_NAMES {
        assert!(names.contains(want), "{ALERTS} has no alert {want}");
    }
    assert_eq!(names.len(), rules.len(), "alert names are unique");
    for r in &rules {
        let a = &r.alert;
        let f = r
            .for_
            .as_deref()
            .unwrap_or_else(|| panic!("{a} has no `for:`"));
        assert!(
            f.ends_with('m') || f.ends_with('h'),
            "{a}: for: {f} (minutes or hours, so a blip does not page)"
        );
        assert!(
            matches!(
                r.labels.get("severity").map(String::as_str),
                Some("warning" | "critical")
            ),
            "{a}: severity label warning or critical, got {:?}",
            r.labels
        );
        for key in ["summary", "description"] {
            let text = r
                .annotations
                .get(key)
                .unwrap_or_else(|| panic!("{a} has no {key} annotation"));
            assert!(
                text.contains("{{ $labels.instance }}"),
                "{a}: {key} names the instance: {text}"
            );
        }
        let d = &r.annotations["description"];
        assert!(
            d.contains("Fix:") && (d.contains("offloadd ") || d.contains("systemctl")),
            "{a}: the description says what to do on the host: {d}"
        );
    }
    let paused = rules
        .iter()
        .find(|r| r.alert == "OffloaddProviderPaused")
        .unwrap();
    assert!(paused.expr.contains("offloadd_provider_paused"));
    assert_eq!(paused.for_.as_deref(), Some("10m"));
    assert!(paused.annotations["summary"].contains("{{ $labels.provider }}"));
}

#[test]
fn dashboard_is_importable() {
    let d = dashboard();
    let ds_input = d["__inputs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["name"] == "DS_PROMETHEUS")
        .expect("__inputs has DS_PROMETHEUS (Import asks for the data source)");
    assert_eq!(
        (&ds_input["type"], &ds_input["pluginId"]),
        (&Json::from("datasource"), &Json::from("prometheus"))
    );
    let schema = d["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()), "title");
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty()), "uid");
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no templating variable {name}"))
    };
    let ds = var("DS_PROMETHEUS");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let inst = var("instance");
    assert_eq!(inst["type"], "query");
    assert_eq!(inst["datasource"]["uid"], "${DS_PROMETHEUS}");
    assert!(
        !variable_queries(&d).is_empty(),
        "the instance variable has a query"
    );

    let ps = panels(&d);
    let mut ids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    for p in &ps {
        let id = p["id"].as_u64().expect("every panel has a numeric id");
        assert!(ids.insert(id), "panel id {id} is used twice");
        let title = p["title"].as_str().unwrap_or("");
        assert!(!title.is_empty(), "panel {id} has a title");
        let g = &p["gridPos"];
        let (x, w, h) = (g["x"].as_u64(), g["w"].as_u64(), g["h"].as_u64());
        assert!(
            matches!((x, w, h, g["y"].as_u64()), (Some(x), Some(w), Some(h), Some(_)) if x + w <= 24 && w > 0 && h > 0),
            "panel {id} {title:?}: gridPos {g}"
        );
        if p["type"] == "row" {
            continue;
        }
        titles.insert(title.to_string());
        assert_eq!(
            p["datasource"]["uid"], "${DS_PROMETHEUS}",
            "panel {id} {title:?} uses the chosen data source"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {id} {title:?} has no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {id} {t}");
            assert!(t["refId"].as_str().is_some(), "panel {id}: refId in {t}");
            let e = t["expr"].as_str().expect("each target has an expr");
            assert!(
                e.contains("instance=~\"$instance\""),
                "panel {id} {title:?} follows the instance variable: {e}"
            );
        }
    }
    for want in [
        "Uploads by result",
        "Upload throughput",
        "Queue depth and in flight",
        "Oldest pending and last success",
        "Paused providers",
        "Parked items",
        "Errors by class",
        "Upload duration quantiles",
        "Upload duration distribution",
        "Retries and rescans",
        "state_dir free space",
        "Watch root and pipeline",
        "Waiting for writer",
        "Bandwidth limit",
    ] {
        assert!(titles.contains(want), "no panel {want:?} in {titles:?}");
    }
    assert!(
        ps.iter().any(|p| p["type"] == "heatmap"),
        "the upload duration histogram has a heatmap"
    );
}

#[test]
fn readme_explains_import_and_lists_every_alert() {
    let readme = read("README.md");
    for want in [ALERTS, DASHBOARD, "rule_files", "Import"] {
        assert!(readme.contains(want), "README.md does not mention {want}");
    }
    for a in ALERT_NAMES {
        assert!(readme.contains(a), "README.md does not list alert {a}");
    }
}

#[test]
fn promtool_checks_the_rules_and_the_dashboard_queries() {
    if !require(have_promtool(), "promtool (apt-get install prometheus)") {
        return;
    }
    let out = promtool(&["check", "rules", ALERTS]);
    println!("{out}");
    assert!(out.contains("SUCCESS"), "{out}");

    // The dashboard's PromQL, as recording rules, so promtool parses it.
    let tmp = tempfile::tempdir().unwrap();
    let exprs = dashboard_exprs(&dashboard());
    let mut rules = Vec::new();
    for (i, (place, e)) in exprs.iter().enumerate() {
        let mut rule = serde_yaml::Mapping::new();
        rule.insert("record".into(), format!("dashboard:query_{i}").into());
        rule.insert("expr".into(), expand_grafana_variables(e).into());
        rule.insert(
            "labels".into(),
            Yaml::Mapping(
                [("source".into(), place.clone().into())]
                    .into_iter()
                    .collect(),
            ),
        );
        rules.push(Yaml::Mapping(rule));
    }
    let doc = serde_yaml::to_string(&serde_yaml::Mapping::from_iter([(
        Yaml::from("groups"),
        Yaml::Sequence(vec![Yaml::Mapping(serde_yaml::Mapping::from_iter([
            ("name".into(), "dashboard".into()),
            ("rules".into(), Yaml::Sequence(rules)),
        ]))]),
    )]))
    .unwrap();
    let path = tmp.path().join("dashboard-queries.yml");
    fs::write(&path, doc).unwrap();
    let out = promtool(&["check", "rules", path.to_str().unwrap()]);
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "{out}"
    );
}

/// `promtool test rules` input: the rules with their annotations removed
/// (the tests check when each alert fires and its labels; the wording is
/// checked by alert_rules_are_complete and promtool check rules).
const RULE_TESTS: &str = r#"
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  # A healthy, busy daemon: nothing fires.
  - interval: 1m
    input_series:
      - { series: 'up{job="offloadd",instance="h:9187"}', values: '1x240' }
      - { series: 'offloadd_queue_depth{job="offloadd",instance="h:9187"}', values: '5x240' }
      - { series: 'offloadd_in_flight{job="offloadd",instance="h:9187"}', values: '2x240' }
      - { series: 'offloadd_oldest_pending_age_seconds{job="offloadd",instance="h:9187"}', values: '30x240' }
      - { series: 'offloadd_last_success_age_seconds{job="offloadd",instance="h:9187"}', values: '1x240' }
      - { series: 'offloadd_provider_paused{job="offloadd",instance="h:9187",provider="r2"}', values: '0x240' }
      - { series: 'offloadd_failed_items{job="offloadd",instance="h:9187"}', values: '0x240' }
      - { series: 'offloadd_uploads_total{job="offloadd",instance="h:9187",result="success"}', values: '0+600x240' }
      - { series: 'offloadd_uploads_total{job="offloadd",instance="h:9187",result="transient"}', values: '0+3x240' }
      - { series: 'offloadd_uploads_total{job="offloadd",instance="h:9187",result="vanished"}', values: '0+100x240' }
      - { series: 'offloadd_state_dir_free_bytes{job="offloadd",instance="h:9187"}', values: '50000000000-1000x240' }
      - { series: 'offloadd_root_available{job="offloadd",instance="h:9187"}', values: '1x240' }
      - { series: 'offloadd_pipeline_paused{job="offloadd",instance="h:9187"}', values: '0x240' }
    alert_rule_test:
      - { eval_time: 4h, alertname: OffloaddDown, exp_alerts: [] }
      - { eval_time: 4h, alertname: OffloaddBacklogGrowing, exp_alerts: [] }
      - { eval_time: 4h, alertname: OffloaddNoRecentUpload, exp_alerts: [] }
      - { eval_time: 4h, alertname: OffloaddProviderPaused, exp_alerts: [] }
      - { eval_time: 4h, alertname: OffloaddParkedItems, exp_alerts: [] }
      - { eval_time: 4h, alertname: OffloaddUploadErrorsHigh, exp_alerts: [] }
      - { eval_time: 4h, alertname: OffloaddStateDirNearlyFull, exp_alerts: [] }
      - { eval_time: 4h, alertname: OffloaddRootUnavailable, exp_alerts: [] }
      - { eval_time: 4h, alertname: OffloaddPipelinePaused, exp_alerts: [] }

  # Down: not scraped from minute 2.
  - interval: 1m
    input_series:
      - { series: 'up{job="offloadd",instance="h:9187"}', values: '1 1 0x30' }
    alert_rule_test:
      - { eval_time: 5m, alertname: OffloaddDown, exp_alerts: [] }
      - eval_time: 10m
        alertname: OffloaddDown
        exp_alerts: [{ exp_labels: { severity: critical, job: offloadd, instance: "h:9187" } }]

  # Backlog: a's oldest file ages (> 30 min from minute 31, fires 15 min
  # later); b's queue grows past 100; c waits briefly with a steady queue.
  - interval: 1m
    input_series:
      - { series: 'offloadd_oldest_pending_age_seconds{job="offloadd",instance="a"}', values: '0+60x90' }
      - { series: 'offloadd_queue_depth{job="offloadd",instance="a"}', values: '5x90' }
      - { series: 'offloadd_oldest_pending_age_seconds{job="offloadd",instance="b"}', values: '60x90' }
      - { series: 'offloadd_queue_depth{job="offloadd",instance="b"}', values: '0+10x90' }
      - { series: 'offloadd_oldest_pending_age_seconds{job="offloadd",instance="c"}', values: '600x90' }
      - { series: 'offloadd_queue_depth{job="offloadd",instance="c"}', values: '500x90' }
    alert_rule_test:
      - { eval_time: 20m, alertname: OffloaddBacklogGrowing, exp_alerts: [] }
      - eval_time: 30m
        alertname: OffloaddBacklogGrowing
        exp_alerts: [{ exp_labels: { severity: warning, job: offloadd, instance: b } }]
      - eval_time: 60m
        alertname: OffloaddBacklogGrowing
        exp_alerts:
          - { exp_labels: { severity: warning, job: offloadd, instance: a } }
          - { exp_labels: { severity: warning, job: offloadd, instance: b } }

  # No recent upload: a has files waiting, b has none, c has one in flight.
  - interval: 1m
    input_series:
      - { series: 'offloadd_last_success_age_seconds{job="offloadd",instance="a"}', values: '0+60x120' }
      - { series: 'offloadd_queue_depth{job="offloadd",instance="a"}', values: '3x120' }
      - { series: 'offloadd_in_flight{job="offloadd",instance="a"}', values: '0x120' }
      - { series: 'offloadd_last_success_age_seconds{job="offloadd",instance="b"}', values: '0+60x120' }
      - { series: 'offloadd_queue_depth{job="offloadd",instance="b"}', values: '0x120' }
      - { series: 'offloadd_in_flight{job="offloadd",instance="b"}', values: '0x120' }
      - { series: 'offloadd_last_success_age_seconds{job="offloadd",instance="c"}', values: '0+60x120' }
      - { series: 'offloadd_queue_depth{job="offloadd",instance="c"}', values: '0x120' }
      - { series: 'offloadd_in_flight{job="offloadd",instance="c"}', values: '1x120' }
    alert_rule_test:
      - { eval_time: 70m, alertname: OffloaddNoRecentUpload, exp_alerts: [] }
      - eval_time: 90m
        alertname: OffloaddNoRecentUpload
        exp_alerts:
          - { exp_labels: { severity: warning, job: offloadd, instance: a } }
          - { exp_labels: { severity: warning, job: offloadd, instance: c } }

  # Provider r2 paused from minute 2; s3 fine.
  - interval: 1m
    input_series:
      - { series: 'offloadd_provider_paused{job="offloadd",instance="h",provider="r2"}', values: '0 0 1x30' }
      - { series: 'offloadd_provider_paused{job="offloadd",instance="h",provider="s3"}', values: '0x32' }
    alert_rule_test:
      - { eval_time: 11m, alertname: OffloaddProviderPaused, exp_alerts: [] }
      - eval_time: 13m
        alertname: OffloaddProviderPaused
        exp_alerts: [{ exp_labels: { severity: critical, job: offloadd, instance: h, provider: r2 } }]

  # Parked items from minute 2.
  - interval: 1m
    input_series:
      - { series: 'offloadd_failed_items{job="offloadd",instance="h"}', values: '0 0 3x20' }
    alert_rule_test:
      - { eval_time: 5m, alertname: OffloaddParkedItems, exp_alerts: [] }
      - eval_time: 10m
        alertname: OffloaddParkedItems
        exp_alerts: [{ exp_labels: { severity: warning, job: offloadd, instance: h } }]

  # Upload errors: a fails 10 of 11 attempts, b 1 of 11.
  - interval: 1m
    input_series:
      - { series: 'offloadd_uploads_total{job="offloadd",instance="a",result="success"}', values: '0+1x60' }
      - { series: 'offloadd_uploads_total{job="offloadd",instance="a",result="transient"}', values: '0+10x60' }
      - { series: 'offloadd_uploads_total{job="offloadd",instance="b",result="success"}', values: '0+10x60' }
      - { series: 'offloadd_uploads_total{job="offloadd",instance="b",result="provider"}', values: '0+1x60' }
    alert_rule_test:
      - eval_time: 40m
        alertname: OffloaddUploadErrorsHigh
        exp_alerts: [{ exp_labels: { severity: warning, job: offloadd, instance: a } }]

  # state_dir: a has 500 MB free, b 100 GB steady, c 100 GB losing 1 GB a minute.
  - interval: 1m
    input_series:
      - { series: 'offloadd_state_dir_free_bytes{job="offloadd",instance="a"}', values: '500000000x60' }
      - { series: 'offloadd_state_dir_free_bytes{job="offloadd",instance="b"}', values: '100000000000x60' }
      - { series: 'offloadd_state_dir_free_bytes{job="offloadd",instance="c"}', values: '100000000000-1000000000x60' }
    alert_rule_test:
      - { eval_time: 5m, alertname: OffloaddStateDirNearlyFull, exp_alerts: [] }
      - eval_time: 30m
        alertname: OffloaddStateDirNearlyFull
        exp_alerts:
          - { exp_labels: { severity: warning, job: offloadd, instance: a } }
          - { exp_labels: { severity: warning, job: offloadd, instance: c } }

  # a loses its root from minute 2 (the pipeline pauses too: only the root
  # alert fires); b's state_dir fails from minute 2.
  - interval: 1m
    input_series:
      - { series: 'offloadd_root_available{job="offloadd",instance="a"}', values: '1 1 0x20' }
      - { series: 'offloadd_pipeline_paused{job="offloadd",instance="a"}', values: '0 0 1x20' }
      - { series: 'offloadd_root_available{job="offloadd",instance="b"}', values: '1x22' }
      - { series: 'offloadd_pipeline_paused{job="offloadd",instance="b"}', values: '0 0 1x20' }
    alert_rule_test:
      - { eval_time: 5m, alertname: OffloaddRootUnavailable, exp_alerts: [] }
      - { eval_time: 5m, alertname: OffloaddPipelinePaused, exp_alerts: [] }
      - eval_time: 10m
        alertname: OffloaddRootUnavailable
        exp_alerts: [{ exp_labels: { severity: critical, job: offloadd, instance: a } }]
      - eval_time: 10m
        alertname: OffloaddPipelinePaused
        exp_alerts: [{ exp_labels: { severity: critical, job: offloadd, instance: b } }]
"#;

#[test]
fn alerts_fire_on_matching_series_and_stay_quiet_when_healthy() {
    if !require(have_promtool(), "promtool (apt-get install prometheus)") {
        return;
    }
    let mut doc: Yaml = serde_yaml::from_str(&read(ALERTS)).unwrap();
    for g in doc["groups"].as_sequence_mut().unwrap() {
        for r in g["rules"].as_sequence_mut().unwrap() {
            r.as_mapping_mut().unwrap().remove("annotations");
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    fs::write(
        tmp.path().join("rules.yml"),
        serde_yaml::to_string(&doc).unwrap(),
    )
    .unwrap();
    // Every alert is exercised.
    for a in ALERT_NAMES {
        assert!(
            RULE_TESTS.contains(&format!("alertname: {a}\n")),
            "no firing test for {a}"
        );
    }
    let tests = tmp.path().join("tests.yml");
    fs::write(&tests, RULE_TESTS).unwrap();
    let out = promtool(&["test", "rules", tests.to_str().unwrap()]);
    println!("{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}

// ---------------------------------------------------------------------------
// against a running daemon

#[test]
fn every_queried_metric_is_served_by_a_running_daemon() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let port = free_port();
    let cfg = Cfg::new(&s3.endpoint());
    env.write_raw_config(&env.config_yaml_http(&cfg, port, Some(PUBLIC_URL)));
    let daemon = Daemon::start(&env, &[]);
    wait_http_ready(port);

    // One upload, so the success series and the histogram have samples.
    let bytes = file_content("metrics.png", 100, 5_000);
    write_and_wait(&env, &s3, "metrics.png", &bytes);
    let mut text = String::new();
    wait_until(LONG, "/metrics counts the upload, gauges published", || {
        text = http_get(port, "/metrics").text();
        metric_value(&text, "offloadd_uploads_total{result=\"success\"}") == Some(1.0)
            && metric_value(&text, "offloadd_upload_duration_seconds_count") == Some(1.0)
            && metric_value(&text, "offloadd_root_available") == Some(1.0)
    });
    assert!(
        metric_value(
            &text,
            &format!("offloadd_provider_paused{{provider=\"{PROVIDER}\"}}")
        ) == Some(0.0),
        "the active provider has a provider_paused series at 0:\n{text}"
    );
    let scrape = parse_scrape(&text);

    let alerts = alert_exprs();
    let d = dashboard();
    let mut board = dashboard_exprs(&d);
    board.extend(variable_queries(&d));
    assert!(!alerts.is_empty() && !board.is_empty());

    let mut problems = scrape.unserved(&alerts);
    problems.extend(scrape.unserved(&board));
    assert!(
        problems.is_empty(),
        "queried but not served:\n  {}\n/metrics:\n{text}",
        problems.join("\n  ")
    );

    // The check can fail against this very scrape.
    let made_up = vec![(
        "made-up".to_string(),
        "rate(offloadd_does_not_exist_total[5m]) > 0 and offloadd_queue_depth".to_string(),
    )];
    let missing = scrape.unserved(&made_up);
    assert!(
        missing.len() == 1 && missing[0].contains("offloadd_does_not_exist_total"),
        "{missing:?}"
    );

    // Each file uses at least what the issue asks for.
    let used = scrape.families(&alerts);
    for m in ALERT_METRICS {
        assert!(used.contains(*m), "{ALERTS} does not query {m}: {used:?}");
    }
    let used = scrape.families(&board);
    for m in DASHBOARD_METRICS {
        assert!(
            used.contains(*m),
            "{DASHBOARD} does not query {m}: {used:?}"
        );
    }
    // And the issue's list is what the daemon serves.
    for m in DASHBOARD_METRICS {
        let family = scrape.family(&format!("{m}_count"));
        assert!(
            scrape.samples.contains(*m) || family == *m,
            "the daemon does not serve {m}:\n{text}"
        );
    }
    println!(
        "served and queried: {}",
        scrape
            .families(&alerts)
            .union(&scrape.families(&board))
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );

    // The root moved away: the gauge falls to 0 (what the
    // OffloaddRootUnavailable alert reads), and rises when it is back.
    let away = env.dir.path().join("results.away");
    fs::rename(&env.root, &away).unwrap();
    wait_until(LONG, "offloadd_root_available is 0", || {
        let text = http_get(port, "/metrics").text();
        metric_value(&text, "offloadd_root_available") == Some(0.0)
            && metric_value(&text, "offloadd_pipeline_paused") == Some(1.0)
    });
    fs::rename(&away, &env.root).unwrap();
    wait_until(LONG, "offloadd_root_available is 1 again", || {
        metric_value(
            &http_get(port, "/metrics").text(),
            "offloadd_root_available",
        ) == Some(1.0)
    });
    daemon.stop();
}
