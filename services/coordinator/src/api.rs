//! The gRPC adapter of `mip.v1.Coordinator`: unwrap the request, call [`Coordinator`], convert the error. The
//! `Generate` call's own deadline (its `grpc-timeout` header) bounds its task. A WatchJob stream of a job this
//! coordinator stops running (another replica claimed it, or this one is shutting down) ends with UNAVAILABLE
//! `job_moved`: watching again follows the job to wherever it runs.

use std::pin::Pin;

use futures::Stream;
use mip_proto::v1::coordinator_server::Coordinator as CoordinatorRpc;
use mip_proto::v1::{
    job_event, CancelJobRequest, GenerateResponse, GenerationRequest, GetJobRequest, Job, JobEvent, ListJobsRequest,
    ListJobsResponse, ListWorkersRequest, ListWorkersResponse, SubmitJobRequest, WatchJobRequest,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::CoordinatorError;
use crate::service::{Caller, Coordinator};

/// Events buffered per WatchJob stream.
const WATCH_BUFFER: usize = 64;

/// The tonic service.
pub struct CoordinatorApi {
    core: Coordinator,
}

impl CoordinatorApi {
    pub fn new(core: Coordinator) -> Self {
        Self { core }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

fn is_done(e: &JobEvent) -> bool {
    matches!(e.event, Some(job_event::Event::Done(_)))
}

#[tonic::async_trait]
impl CoordinatorRpc for CoordinatorApi {
    async fn submit_job(&self, r: Request<SubmitJobRequest>) -> Result<Response<Job>, Status> {
        let caller = Caller::of(r.metadata());
        Ok(Response::new(self.core.submit_with(r.into_inner(), caller).await?))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(&self, r: Request<WatchJobRequest>) -> Result<Response<EventStream>, Status> {
        let job_id = r.into_inner().job_id;
        let w = self.core.watch(&job_id).await?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(async move {
            for e in w.replay {
                let done = is_done(&e);
                if tx.send(Ok(e)).await.is_err() || done {
                    return;
                }
            }
            let Some(mut live) = w.live else { return };
            let mut moved = w.moved;
            let job_moved = async {
                match moved.as_mut() {
                    Some(m) => {
                        let _ = m.wait_for(|gone| *gone).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(job_moved);
            loop {
                let next = tokio::select! {
                    biased;
                    r = live.recv() => r,
                    () = tx.closed() => return,
                    () = &mut job_moved => {
                        let _ = tx.send(Err(CoordinatorError::Moved(job_id).into())).await;
                        return;
                    }
                };
                match next {
                    Ok(e) => {
                        let done = is_done(&e);
                        if tx.send(Ok(e)).await.is_err() || done {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let msg = format!("the watcher fell {n} events behind; watch again to resync");
                        let _ = tx.send(Err(Status::data_loss(msg))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_job(&self, r: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let r = r.into_inner();
        Ok(Response::new(self.core.get(&r.job_id, r.include_images).await?))
    }

    async fn cancel_job(&self, r: Request<CancelJobRequest>) -> Result<Response<Job>, Status> {
        Ok(Response::new(self.core.cancel(&r.into_inner().job_id).await?))
    }

    async fn list_jobs(&self, r: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        let r = r.into_inner();
        Ok(Response::new(self.core.list_jobs(r.page_size, &r.page_token).await?))
    }

    async fn list_workers(&self, _: Request<ListWorkersRequest>) -> Result<Response<ListWorkersResponse>, Status> {
        Ok(Response::new(ListWorkersResponse {
            workers: self.core.list_workers(),
        }))
    }

    async fn generate(&self, r: Request<GenerationRequest>) -> Result<Response<GenerateResponse>, Status> {
        let caller = Caller::of(r.metadata());
        let (job_id, images) = self.core.generate(r.into_inner(), caller).await?;
        Ok(Response::new(GenerateResponse { job_id, images }))
    }
}
