//! The gRPC adapter of `mip.v1.Worker`: per call it reads the deadline (`grpc-timeout`), takes the message, calls
//! the [`WorkerService`], converts the error through `mip_common::errors::status` and counts the outcome in
//! `mip_grpc_requests_total`. Each call runs in a span whose parent is the W3C trace context found in the request
//! metadata, so a job's trace continues from the coordinator into the worker. No domain logic lives here.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use mip_proto::v1 as pb;
use mip_proto::v1::worker_server::Worker;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use crate::metrics::Metrics;
use crate::service::{CallContext, WorkerError, WorkerService};

const SERVICE: &str = "mip.v1.Worker";

/// `mip.v1.Worker` over a [`WorkerService`].
pub struct WorkerApi<S> {
    svc: S,
    metrics: Metrics,
}

impl<S: WorkerService> WorkerApi<S> {
    pub fn new(svc: S, metrics: Metrics) -> Self {
        Self { svc, metrics }
    }

    fn observe<T>(&self, method: &str, r: &Result<T, Status>) {
        observe(&self.metrics, method, r.as_ref().err().map_or(Code::Ok, Status::code));
    }
}

fn observe(metrics: &Metrics, method: &str, code: Code) {
    metrics
        .grpc_requests
        .with_label_values(&[SERVICE, method, &format!("{code:?}")])
        .inc();
}

/// The status of a service error: its kind's code, its reason in `mip-reason`, its message.
pub fn to_status(e: &WorkerError) -> Status {
    mip_common::errors::status(e.kind(), Some(e.reason()), e.to_string())
}

fn context<T>(req: &Request<T>) -> CallContext {
    let timeout = mip_common::deadline::grpc_timeout(req.metadata());
    CallContext {
        deadline: timeout.map(|t| tokio::time::Instant::now() + t),
    }
}

/// A server span for one call, child of the caller's trace context when the metadata carries one.
fn call_span<T>(method: &'static str, req: &Request<T>) -> tracing::Span {
    let span = tracing::info_span!(
        "mip.v1.Worker",
        rpc.method = method,
        otel.kind = "server",
        task_id = tracing::field::Empty
    );
    mip_common::propagation::set_parent_from(&span, req.metadata());
    span
}

/// The stream type of `Generate`.
pub type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl<S: WorkerService> Worker for WorkerApi<S> {
    async fn encode_subjects(
        &self,
        request: Request<pb::EncodeSubjectsRequest>,
    ) -> Result<Response<pb::EncodeSubjectsResponse>, Status> {
        let ctx = context(&request);
        let span = call_span("EncodeSubjects", &request);
        let r = self
            .svc
            .encode_subjects(request.into_inner(), ctx)
            .instrument(span)
            .await;
        let r = r.map(Response::new).map_err(|e| to_status(&e));
        self.observe("EncodeSubjects", &r);
        r
    }

    type GenerateStream = GenerateStream;

    async fn generate(&self, request: Request<pb::GenerateTask>) -> Result<Response<GenerateStream>, Status> {
        let ctx = context(&request);
        let span = call_span("Generate", &request);
        span.record("task_id", request.get_ref().task_id.as_str());
        let r = self
            .svc
            .generate(request.into_inner(), ctx)
            .instrument(span)
            .await
            .map_err(|e| to_status(&e));
        if r.is_err() {
            self.observe("Generate", &r);
        }
        let metrics = self.metrics.clone();
        let stream = ReceiverStream::new(r?).map(move |item| {
            let item = item.map_err(|e| to_status(&e));
            match &item {
                Err(s) => observe(&metrics, "Generate", s.code()),
                Ok(pb::GenerateEvent {
                    event: Some(pb::generate_event::Event::Image(_)),
                }) => observe(&metrics, "Generate", Code::Ok),
                Ok(_) => {}
            }
            item
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn info(&self, _request: Request<pb::InfoRequest>) -> Result<Response<pb::WorkerInfo>, Status> {
        let r = Ok(Response::new(self.svc.info()));
        self.observe("Info", &r);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_kind_and_reason() {
        let s = to_status(&WorkerError::QueueFull { capacity: 1 });
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(mip_common::errors::reason_of(&s).as_deref(), Some("queue_full"));
        let s = to_status(&WorkerError::NotReady);
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(mip_common::errors::reason_of(&s).as_deref(), Some("not_ready"));
    }
}
