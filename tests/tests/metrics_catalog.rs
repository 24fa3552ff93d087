//! The metric list the Helm chart's Grafana dashboard is checked against (`deploy/helm/mip-cluster/dashboards/
//! metrics.txt`, read by `deploy/check.sh`) against what the services really serve: a worker and a coordinator with
//! their `/metrics` endpoints run a job (and refuse one), and every family they expose must be in the list with the
//! same type and labels. A listed family that was not exposed must have labels (a labelled family appears only once
//! one of its label values is used, e.g. an error reason that did not happen).

use std::collections::BTreeMap;

use mip_proto::v1::JobStatus;
use mip_tests::*;

/// name → (type, labels), from `metrics.txt`.
fn catalog() -> BTreeMap<String, (String, Vec<String>)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/helm/mip-cluster/dashboards/metrics.txt"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut words = l.split_whitespace().map(str::to_owned);
            let name = words.next().expect("name");
            let kind = words.next().unwrap_or_else(|| panic!("no type in {l:?}"));
            let mut labels: Vec<String> = words.collect();
            labels.sort();
            (name, (kind, labels))
        })
        .collect()
}

/// name → (type, labels) of a Prometheus text exposition.
fn exposed(text: &str) -> BTreeMap<String, (String, Vec<String>)> {
    let mut out: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE line");
            out.insert(name.to_owned(), (kind.to_owned(), Vec::new()));
            continue;
        }
        if l.starts_with('#') || l.is_empty() {
            continue;
        }
        let series = l.split_whitespace().next().expect("series");
        let (metric, labels) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| metric.strip_suffix(s).filter(|f| out.contains_key(*f)))
            .unwrap_or(metric);
        let Some((_, names)) = out.get_mut(family) else {
            continue;
        };
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            let key = pair.split_once('=').expect("label pair").0.to_owned();
            if key != "le" && !names.contains(&key) {
                names.push(key);
                names.sort();
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboards_metric_list_matches_the_services() {
    let (wm, cm) = (free_addr(), free_addr());
    let ws = workers_with(1, |c| c.telemetry.metrics_listen = wm.to_string()).await;
    let cfg = config(vec![url(&ws[0], "http")], None, |c| {
        c.telemetry.metrics_listen = cm.to_string();
    });
    let mut coord = Coord::run(cfg, None, None).await;
    wait_healthy(&mut coord.client, 1).await;
    let (status, _) = run_job(&mut coord.client, cat(), 1, 0).await;
    assert_eq!(status, JobStatus::Done as i32);
    let mut bad = job(2, 1, "");
    bad.requests[0].steps = 100_000;
    assert!(coord.client.submit_job(bad).await.is_err(), "an invalid job is refused");

    let list = catalog();
    let mut seen = BTreeMap::new();
    for addr in [wm, cm] {
        let text = http_get(addr, "/metrics").await;
        let body = text.split("\r\n\r\n").nth(1).unwrap_or(&text);
        seen.extend(exposed(body));
    }
    for (name, got) in &seen {
        let listed = list
            .get(name)
            .unwrap_or_else(|| panic!("{name} {got:?} is served but not in metrics.txt"));
        assert_eq!(
            listed, got,
            "{name}: metrics.txt says {listed:?}, the service serves {got:?}"
        );
    }
    for (name, (kind, labels)) in &list {
        assert!(
            seen.contains_key(name) || !labels.is_empty(),
            "{name} ({kind}) is in metrics.txt but no service serves it"
        );
    }
    stop_all(coord, ws).await;
}
