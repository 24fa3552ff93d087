//! One trace per job, as an operator's tracing backend receives it: a real OTLP/gRPC receiver in this process, a
//! worker and a coordinator as `mip serve` child processes exporting to it at their default log level (as the Helm
//! chart starts them), and `mip generate --coordinator` exporting its own span (`OTEL_EXPORTER_OTLP_ENDPOINT`).
//! Within seconds of the command's end the receiver holds one trace: the command's span → the coordinator's job →
//! a task attempt → the worker's Generate → the generation's stage spans, with one trace id and each parent link
//! pointing at the span above.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mip_tests::process::{fixture_setup, mip, mip_cmd, text, tmp, Served};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tonic::transport::server::TcpIncoming;

/// Upper bound of any wait (model load on a slow, busy machine included).
const BOUND: Duration = Duration::from_secs(300);
/// How soon after the command's end its trace must be complete.
const TRACE_BOUND: Duration = Duration::from_secs(15);

/// Every span received, with the `service.name` of its resource.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut all = self.0.lock().expect("spans");
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                all.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Received {
    fn spans(&self) -> Vec<(String, Span)> {
        self.0.lock().expect("spans").clone()
    }
}

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref().and_then(|v| v.value.as_ref()))
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

/// The chain the acceptance asks for, found in `spans` (or what is missing).
fn chain(spans: &[(String, Span)]) -> Result<Vec<String>, String> {
    let by_id: HashMap<Vec<u8>, &(String, Span)> = spans.iter().map(|e| (e.1.span_id.clone(), e)).collect();
    let find = |what: &str, pred: &dyn Fn(&(String, Span)) -> bool| {
        let found: Vec<&(String, Span)> = spans.iter().filter(|e| pred(e)).collect();
        if found.is_empty() {
            Err(format!("no {what} span yet"))
        } else {
            Ok(found)
        }
    };
    let cli = find("`mip generate`", &|(svc, s)| svc == "mip" && s.name == "mip generate")?;
    let cli = cli[0];
    let trace = cli.1.trace_id.clone();
    let child_of = |parent: &Span| {
        let parent_id = parent.span_id.clone();
        let trace = trace.clone();
        move |(_, s): &(String, Span)| s.parent_span_id == parent_id && s.trace_id == trace
    };
    let job = find("job", &|e| {
        e.0 == "mip-coordinator" && e.1.name == "job" && child_of(&cli.1)(e)
    })?[0];
    let task = find("task", &|e| {
        e.0 == "mip-coordinator" && e.1.name == "task" && child_of(&job.1)(e)
    })?;
    let generate = find("worker Generate", &|e| {
        e.0 == "mip-worker" && e.1.name == "mip.v1.Worker/Generate" && task.iter().any(|t| child_of(&t.1)(e))
    })?[0];
    // Stages: every span of the worker below its Generate call, whatever the depth.
    let below = |s: &Span| {
        let mut at = s;
        for _ in 0..16 {
            if at.parent_span_id == generate.1.span_id {
                return true;
            }
            match by_id.get(&at.parent_span_id) {
                Some((_, p)) => at = p,
                None => return false,
            }
        }
        false
    };
    let mut stages: Vec<String> = spans
        .iter()
        .filter(|(svc, s)| svc == "mip-worker" && s.trace_id == trace && below(s))
        .map(|(_, s)| s.name.clone())
        .collect();
    stages.sort();
    stages.dedup();
    let wanted = ["text_encode", "subject_encode", "denoise", "vae_decode", "png_encode"];
    let have = wanted.iter().filter(|w| stages.iter().any(|s| s == *w)).count();
    if have < 4 {
        return Err(format!("only these stage spans under Generate: {stages:?}"));
    }
    let tier = spans
        .iter()
        .find(|(_, s)| s.name == "subject_encode" && s.trace_id == trace)
        .and_then(|(_, s)| attr(s, "cache_tier"));
    if tier.is_none() {
        return Err("subject_encode has no cache_tier".to_owned());
    }
    // One trace: every span of the three services from this call shares the command's trace id.
    let other_jobs = spans
        .iter()
        .filter(|(_, s)| s.name == "job" && s.trace_id != trace)
        .count();
    if other_jobs > 0 {
        return Err(format!("{other_jobs} job span(s) in another trace"));
    }
    let mut names = vec![
        cli.1.name.clone(),
        job.1.name.clone(),
        task[0].1.name.clone(),
        generate.1.name.clone(),
    ];
    names.extend(stages);
    Ok(names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_the_cli_to_the_stages_at_the_default_log_level() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let received = Received::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let receiver = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(received.clone()))
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async move {
                let _ = stopped.await;
            }),
    );

    let dir = tmp("otlp-trace");
    let model = fixture_setup(&dir);
    let model = model.to_str().expect("utf-8").to_owned();
    // No -v: the services' default log level. Spans are batched; a short delay keeps the test quick.
    let otlp = endpoint.clone();
    let (worker, coordinator) = tokio::task::spawn_blocking(move || {
        let env = [
            ("MIP_TELEMETRY__OTLP_ENDPOINT", otlp.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ];
        let worker = Served::start(&["serve", "worker", "--listen", "127.0.0.1:0", "--model", &model], &env);
        let worker_url = worker.url("http");
        let coordinator = Served::start(
            &[
                "serve",
                "coordinator",
                "--listen",
                "127.0.0.1:0",
                "--workers",
                &worker_url,
            ],
            &env,
        );
        (worker, coordinator)
    })
    .await
    .expect("services start");
    let url = coordinator.url("http");

    // Wait for the worker to be healthy as the coordinator sees it.
    let start = Instant::now();
    loop {
        let o = mip(&["workers", "--coordinator", &url, "--json"]);
        let healthy = serde_json::from_slice::<Vec<serde_json::Value>>(&o.stdout)
            .unwrap_or_default()
            .iter()
            .any(|w| w["healthy"] == true);
        if healthy {
            break;
        }
        assert!(start.elapsed() < BOUND, "no healthy worker: {}", text(&o));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let out = dir.join("out");
    let cat = dir.join("cat_0.png");
    let o = tokio::task::spawn_blocking({
        let (url, out, cat, endpoint) = (url.clone(), out.clone(), cat.clone(), endpoint.clone());
        move || {
            mip_cmd()
                .args([
                    "generate",
                    "--coordinator",
                    &url,
                    "--prompt",
                    "a cat",
                    "--steps",
                    "2",
                    "--seed",
                    "3",
                ])
                .args([
                    "--subject",
                    &format!("cat={}", cat.display()),
                    "--out",
                    out.to_str().expect("utf-8"),
                ])
                .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
                .env("OTEL_BSP_SCHEDULE_DELAY", "200")
                .output()
                .expect("mip generate runs")
        }
    })
    .await
    .expect("join");
    assert!(o.status.success(), "{}", text(&o));
    let ended = Instant::now();

    let names = loop {
        match chain(&received.spans()) {
            Ok(names) => break names,
            Err(why) if ended.elapsed() > TRACE_BOUND => {
                let got: Vec<(String, String)> = received.spans().into_iter().map(|(svc, s)| (svc, s.name)).collect();
                panic!("no complete trace {TRACE_BOUND:?} after the call: {why}; received {got:?}");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    eprintln!("trace: {names:?}");

    let _ = coordinator.terminate();
    let _ = worker.terminate();
    let _ = stop.send(());
    let _ = receiver.await;
}
