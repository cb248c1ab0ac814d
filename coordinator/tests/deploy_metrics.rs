//! The monitoring recipes in `deploy/` refer only to metrics Tessera exports: every metric
//! name in the Grafana dashboard's queries and in the Prometheus alert rules is one the
//! coordinator or a worker serves (`tessera_coordinator::metrics::exported_names`), and the
//! scrape config reads `/metrics` from both roles, with the coordinator's bearer token. A
//! renamed metric breaks this test instead of an operator's dashboard.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(rel: &str) -> String {
    let path = deploy().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `tessera_…` identifiers in a PromQL expression (label values in quotes are skipped).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut quoted = false;
    let mut word = String::new();
    for c in expr.chars().chain([' ']) {
        if c == '"' {
            quoted = !quoted;
        }
        if !quoted && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            word.push(c);
            continue;
        }
        if word.starts_with("tessera_") {
            names.push(word.clone());
        }
        word.clear();
    }
    names
}

/// Every `expr` of the dashboard's panels, with the panel's title.
fn dashboard_queries(json: &serde_json::Value) -> Vec<(String, String)> {
    let panels = json["panels"].as_array().expect("the dashboard has panels");
    let mut out = Vec::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        let targets = p["targets"].as_array();
        assert!(
            targets.is_some_and(|t| !t.is_empty()),
            "panel {title:?} has no query"
        );
        for t in targets.into_iter().flatten() {
            let expr = t["expr"].as_str().expect("a target's expr").to_string();
            out.push((title.clone(), expr));
        }
    }
    out
}

/// The `expr:` values of an alert rules file.
fn rule_exprs(yaml: &str) -> Vec<String> {
    yaml.lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(|e| e.trim().to_string())
        .collect()
}

fn unknown(exprs: &[(String, String)], exported: &BTreeSet<String>) -> Vec<String> {
    let mut bad = Vec::new();
    for (owner, expr) in exprs {
        for name in metric_names(expr) {
            if !exported.contains(&name) {
                bad.push(format!("{owner}: {name} (in {expr})"));
            }
        }
    }
    bad
}

#[test]
fn the_grafana_dashboard_queries_only_exported_metrics() {
    let text = read("grafana/tessera-dashboard.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let queries = dashboard_queries(&json);
    let exported = tessera_coordinator::metrics::exported_names();
    assert_eq!(unknown(&queries, &exported), Vec::<String>::new());
    let used: BTreeSet<String> = queries.iter().flat_map(|(_, e)| metric_names(e)).collect();
    assert!(used.len() >= 20, "the dashboard shows only {used:?}");
    for wanted in [
        "tessera_jobs",
        "tessera_step_duration_seconds_bucket",
        "tessera_step_critical_path_seconds_bucket",
        "tessera_pool_worker_busy_seconds_total",
        "tessera_worker_gpu_memory_used_bytes",
    ] {
        assert!(used.contains(wanted), "the dashboard lacks {wanted}");
    }
}

#[test]
fn the_alert_rules_refer_only_to_exported_metrics() {
    let rules = rule_exprs(&read("prometheus/tessera-alerts.yml"));
    assert!(rules.len() >= 3, "{rules:?}");
    let owned: Vec<(String, String)> = rules
        .iter()
        .map(|e| ("tessera-alerts.yml".to_string(), e.clone()))
        .collect();
    let exported = tessera_coordinator::metrics::exported_names();
    assert_eq!(unknown(&owned, &exported), Vec::<String>::new());
}

#[test]
fn the_scrape_config_reads_both_roles_and_sends_the_token_to_the_coordinator() {
    let text = read("prometheus/prometheus.yml");
    let jobs: Vec<&str> = text.split("- job_name:").skip(1).collect();
    assert_eq!(jobs.len(), 2, "{text}");
    let job = |name: &str| {
        *jobs
            .iter()
            .find(|j| j.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no job {name}"))
    };
    for name in ["tessera-coordinator", "tessera-workers"] {
        assert!(job(name).contains("metrics_path: /metrics"), "{name}");
        assert!(job(name).contains("targets:"), "{name}");
    }
    let coordinator = job("tessera-coordinator");
    assert!(coordinator.contains("type: Bearer") && coordinator.contains("credentials_file:"));
    let rules = text
        .lines()
        .skip_while(|l| !l.starts_with("rule_files:"))
        .nth(1)
        .and_then(|l| l.trim().strip_prefix("- "))
        .expect("a rule file");
    assert!(deploy().join("prometheus").join(rules).is_file(), "{rules}");
}

#[test]
fn metric_names_are_found_in_promql_and_label_values_are_not() {
    assert_eq!(
        metric_names(r#"sum by (le) (rate(tessera_a_bucket{x="tessera_no"}[5m])) / tessera_b"#),
        ["tessera_a_bucket", "tessera_b"]
    );
}
