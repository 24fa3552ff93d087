//! The configuration as tools see it: `mip config schema worker|coordinator|all` prints a JSON Schema generated from
//! the config structs (the same properties as the defaults the loader starts from, unknown fields refused at every
//! level), and `mip serve … --check-config` runs the real loader and validation, then exits without serving.

use std::collections::BTreeSet;

use mip_tests::process::{mip, mip_cmd, text, tmp};
use serde_json::Value;

/// The schema printed for `service`.
fn schema(service: &str) -> Value {
    let o = mip(&["config", "schema", service]);
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)))
}

/// Resolves `{"$ref": "#/$defs/X"}` (possibly inside `allOf`) against the root.
fn resolve<'a>(root: &'a Value, node: &'a Value) -> &'a Value {
    let r = node["$ref"].as_str().or_else(|| node["allOf"][0]["$ref"].as_str());
    match r.and_then(|r| r.strip_prefix("#/$defs/")) {
        Some(name) => &root["$defs"][name],
        None => node,
    }
}

/// Every object of the schema has exactly the keys of `value` (the serialised defaults) and refuses others.
fn same_shape(root: &Value, node: &Value, value: &Value, at: &str) {
    let node = resolve(root, node);
    let Some(obj) = value.as_object() else { return };
    if node["type"] != "object" {
        return;
    }
    assert_eq!(
        node["additionalProperties"], false,
        "{at}: unknown fields must be refused"
    );
    let props = node["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("{at}: no properties"));
    let want: BTreeSet<&String> = obj.keys().collect();
    let got: BTreeSet<&String> = props.keys().collect();
    assert_eq!(got, want, "{at}: schema properties vs config fields");
    for (k, v) in obj {
        same_shape(root, &props[k], v, &format!("{at}.{k}"));
    }
}

#[test]
fn schemas_match_the_config_structs() {
    let cases = [
        (
            "worker",
            serde_json::to_value(mip_worker::config::WorkerConfig::default()),
        ),
        (
            "coordinator",
            serde_json::to_value(mip_coordinator::config::CoordinatorConfig::default()),
        ),
    ];
    for (service, defaults) in cases {
        let s = schema(service);
        assert_eq!(
            s["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{service}"
        );
        same_shape(&s, &s, &defaults.expect("defaults serialise"), service);
    }
    let all = schema("all");
    let props: BTreeSet<&String> = all["properties"].as_object().expect("properties").keys().collect();
    assert_eq!(props, BTreeSet::from([&"coordinator".to_owned(), &"worker".to_owned()]));
    let log_format = resolve(
        &schema("worker"),
        &schema("worker")["$defs"]["TelemetrySection"]["properties"]["log_format"],
    )
    .clone();
    assert!(
        log_format.to_string().contains("json"),
        "enumerated values are in the schema: {log_format}"
    );
}

#[test]
fn check_config_runs_the_loader_and_exits() {
    let dir = tmp("check-config");
    let write = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(&p, body).expect("write");
        p.to_str().expect("utf-8").to_owned()
    };
    let good = write(
        "good.yaml",
        "server:\n  listen: 127.0.0.1:0\ntelemetry:\n  log_format: json\n",
    );
    let o = mip(&[
        "serve",
        "coordinator",
        "--config",
        &good,
        "--workers",
        "http://w:1",
        "--check-config",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("coordinator configuration is valid"), "{}", text(&o));
    let o = mip(&["serve", "worker", "--config", &good, "--check-config"]);
    assert!(
        o.status.success() && text(&o).contains("worker configuration is valid"),
        "{}",
        text(&o)
    );

    let unknown = write("unknown.yaml", "server:\n  listn: 127.0.0.1:0\n");
    let o = mip(&["serve", "worker", "--config", &unknown, "--check-config"]);
    assert!(!o.status.success(), "an unknown field is refused");
    assert!(text(&o).contains("listn"), "{}", text(&o));

    let bad = write("bad.yaml", "telemetry:\n  sample_ratio: 2.5\n");
    let o = mip_cmd()
        .args(["serve", "worker", "--config", &bad, "--check-config"])
        .output()
        .expect("runs");
    assert!(!o.status.success());
    assert!(
        text(&o).contains("telemetry.sample_ratio") && text(&o).contains("2.5"),
        "{}",
        text(&o)
    );
    // The environment is part of what is checked.
    let o = mip_cmd()
        .args(["serve", "coordinator", "--workers", "http://w:1", "--check-config"])
        .env("MIP_REDIS__TTL_SECONDS", "0")
        .output()
        .expect("runs");
    assert!(
        !o.status.success() && text(&o).contains("redis.ttl_seconds"),
        "{}",
        text(&o)
    );
}
