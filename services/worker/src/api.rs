//! The gRPC adapter of `mip.v1.Worker`: per call it reads the deadline (`grpc-timeout`), takes the message, calls
//! the [`WorkerService`] and converts the error through `mip_common::errors::status`. The call's span (a child of
//! the caller's trace) and its request metrics come from the server's
//! [`RequestLayer`](mip_common::request_layer::RequestLayer). No domain logic lives here.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use mip_proto::v1 as pb;
use mip_proto::v1::worker_server::Worker;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::service::{CallContext, WorkerError, WorkerService};

/// `mip.v1.Worker` over a [`WorkerService`].
pub struct WorkerApi<S> {
    svc: S,
}

impl<S: WorkerService> WorkerApi<S> {
    pub fn new(svc: S) -> Self {
        Self { svc }
    }
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

/// The stream type of `Generate`.
pub type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl<S: WorkerService> Worker for WorkerApi<S> {
    async fn encode_subjects(
        &self,
        request: Request<pb::EncodeSubjectsRequest>,
    ) -> Result<Response<pb::EncodeSubjectsResponse>, Status> {
        let ctx = context(&request);
        let r = self.svc.encode_subjects(request.into_inner(), ctx).await;
        r.map(Response::new).map_err(|e| to_status(&e))
    }

    type GenerateStream = GenerateStream;

    async fn generate(&self, request: Request<pb::GenerateTask>) -> Result<Response<GenerateStream>, Status> {
        let ctx = context(&request);
        // The call's span is the layer's; the task id is this method's own attribute of it.
        tracing::Span::current().set_attribute("task_id", request.get_ref().task_id.clone());
        let events = self
            .svc
            .generate(request.into_inner(), ctx)
            .await
            .map_err(|e| to_status(&e))?;
        let stream = ReceiverStream::new(events).map(|item| item.map_err(|e| to_status(&e)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn info(&self, _request: Request<pb::InfoRequest>) -> Result<Response<pb::WorkerInfo>, Status> {
        Ok(Response::new(self.svc.info()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

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
