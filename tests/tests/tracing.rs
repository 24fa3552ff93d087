//! One trace per job, across the process boundary to the workers: an OpenTelemetry tracer provider whose exporter
//! keeps every finished span in memory is this test binary's global tracing subscriber (so it has this file to
//! itself); a 2-image job runs over two in-process workers, and the workers' Generate call spans carry the job
//! span's trace id, each a child of one of the coordinator's task spans.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mip_tests::*;
use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry::Value;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::layer::SubscriberExt as _;

/// Keeps every exported span.
#[derive(Debug, Clone, Default)]
struct Spans(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Spans {
    fn export(&self, batch: Vec<SpanData>) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        self.0.lock().expect("spans").extend(batch);
        std::future::ready(Ok(()))
    }
}

impl Spans {
    /// The spans exported so far that `pred` accepts.
    fn matching(&self, pred: impl Fn(&SpanData) -> bool) -> Vec<SpanData> {
        self.0
            .lock()
            .expect("spans")
            .iter()
            .filter(|s| pred(s))
            .cloned()
            .collect()
    }

    /// Waits (bounded) until `pred` accepts at least `n` exported spans; returns them.
    async fn wait_for(&self, n: usize, what: &str, pred: impl Fn(&SpanData) -> bool) -> Vec<SpanData> {
        let found = tokio::time::timeout(BOUND, async {
            loop {
                let got = self.matching(&pred);
                if got.len() >= n {
                    return got;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("fewer than {n} {what} spans were exported"))
    }
}

/// The span's attribute `key` as a string.
fn attr(s: &SpanData, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| match &kv.value {
            Value::String(v) => v.as_str().to_owned(),
            other => other.to_string(),
        })
}

/// Installs the in-memory exporter behind the global subscriber and the W3C propagator.
fn install() -> Spans {
    let spans = Spans::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(spans.clone()).build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("coordinator-trace-test")));
    tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber of this binary");
    spans
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_per_job_reaches_the_workers() {
    let spans = install();
    let ws = workers(2).await;
    let urls = ws.iter().map(|w| url(w, "http")).collect();
    let mut coord = Coord::run(config(urls, None, |_| {}), None, None).await;
    wait_healthy(&mut coord.client, 2).await;
    let submitted = submit(&mut coord.client, job(2, 2, "")).await;
    let (_, done) = watch_all(&mut coord.client, &submitted.job_id).await;
    assert_eq!(done.status, mip_proto::v1::JobStatus::Done as i32, "{done:?}");
    let id = submitted.job_id.clone();

    // The coordinator's task spans (children of the job span) end with their tasks.
    let tasks = spans
        .wait_for(2, "task", |s| {
            s.name == "task" && attr(s, "job_id").as_deref() == Some(id.as_str())
        })
        .await;
    let trace: HashSet<TraceId> = tasks.iter().map(|s| s.span_context.trace_id()).collect();
    assert_eq!(trace.len(), 1, "the job's tasks share one trace: {tasks:?}");
    let trace = *trace.iter().next().expect("one trace");
    let job_span: HashSet<SpanId> = tasks.iter().map(|s| s.parent_span_id).collect();
    assert_eq!(job_span.len(), 1, "the tasks have one parent, the job span: {tasks:?}");
    let task_ids: HashSet<SpanId> = tasks.iter().map(|s| s.span_context.span_id()).collect();

    // The workers' Generate spans: in the job's trace, each under a task span, their parent remote.
    let generate =
        |s: &SpanData| s.name == "mip.v1.Worker/Generate" && attr(s, "rpc.method").as_deref() == Some("Generate");
    let calls = spans.wait_for(2, "worker Generate", generate).await;
    for c in &calls {
        assert_eq!(
            c.span_context.trace_id(),
            trace,
            "a worker span outside the job's trace: {c:?}"
        );
        assert!(task_ids.contains(&c.parent_span_id), "parent is a task span: {c:?}");
        assert!(c.parent_span_is_remote, "the parent came over gRPC metadata: {c:?}");
    }

    // The job span itself ends (at the latest) when the coordinator stops, with the same trace.
    stop_all(coord, ws).await;
    let job = spans
        .wait_for(1, "job", |s| {
            s.name == "job" && attr(s, "job_id").as_deref() == Some(id.as_str())
        })
        .await;
    assert_eq!(job[0].span_context.trace_id(), trace);
    assert_eq!(Some(&job[0].span_context.span_id()), job_span.iter().next());
    // Nothing else of the job's trace went to a worker: exactly its two images were generated there.
    let in_trace = spans.matching(|s| generate(s) && s.span_context.trace_id() == trace);
    assert_eq!(in_trace.len(), 2, "{in_trace:?}");
}
