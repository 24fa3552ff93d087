//! A synthetic worker for the cluster benchmark: it speaks `mip.v1.Worker` and `grpc.health.v1` like a real one,
//! runs one generation at a time (one "device"), spends a fixed service time per image (a progress event per step)
//! and answers a fixed 8x8 PNG. With it the benchmark measures the coordinator's own cost and its scaling with
//! the number of workers, free of the model's compute (which on a CPU host would share the same cores).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use mip_proto::v1::worker_server::{Worker, WorkerServer, SERVICE_NAME};
use mip_proto::v1::{
    generate_event, Counters, EncodeSubjectsRequest, EncodeSubjectsResponse, GenerateEvent, GenerateTask, Image,
    InfoRequest, Progress, WorkerInfo,
};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// One synthetic worker's behaviour.
struct Synthetic {
    service_time: Duration,
    device: Arc<Semaphore>,
    generations: Arc<AtomicU64>,
    png: Arc<Vec<u8>>,
}

type EventStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<GenerateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for Synthetic {
    async fn encode_subjects(
        &self,
        _: Request<EncodeSubjectsRequest>,
    ) -> Result<Response<EncodeSubjectsResponse>, Status> {
        Err(Status::unimplemented("the synthetic worker only generates"))
    }

    type GenerateStream = EventStream;

    async fn generate(&self, r: Request<GenerateTask>) -> Result<Response<EventStream>, Status> {
        let request = r.into_inner().request.unwrap_or_default();
        let steps = request.steps.max(1);
        let (tx, rx) = mpsc::channel(4);
        let device = self.device.clone();
        let per_step = self.service_time / steps;
        let (png, generations) = (self.png.clone(), self.generations.clone());
        tokio::spawn(async move {
            let Ok(_slot) = device.acquire_owned().await else {
                return;
            };
            for step in 1..=steps {
                tokio::time::sleep(per_step).await;
                let ev = generate_event::Event::Progress(Progress { step, total: steps });
                if tx.send(Ok(GenerateEvent { event: Some(ev) })).await.is_err() {
                    return;
                }
            }
            generations.fetch_add(1, Ordering::Relaxed);
            let image = Image {
                png: png.to_vec(),
                seed: request.seed.unwrap_or(0),
                width: 8,
                height: 8,
                ..Default::default()
            };
            let ev = generate_event::Event::Image(image);
            let _ = tx.send(Ok(GenerateEvent { event: Some(ev) })).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<WorkerInfo>, Status> {
        Ok(Response::new(WorkerInfo {
            worker_id: "synthetic".into(),
            model: "synthetic".into(),
            device: "none".into(),
            capacity: 1,
            ready: true,
            counters: Some(Counters {
                generations: self.generations.load(Ordering::Relaxed),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }
}

/// A running synthetic worker; stops when dropped.
pub struct SyntheticWorker {
    pub url: String,
    _stop: oneshot::Sender<()>,
}

/// An 8x8 grey PNG.
fn tiny_png() -> Result<Vec<u8>> {
    let img = image::RgbImage::from_pixel(8, 8, image::Rgb([128, 128, 128]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .context("encoding the synthetic PNG")?;
    Ok(out.into_inner())
}

/// Starts a synthetic worker on 127.0.0.1:0 spending `service_time` per image.
pub async fn start(service_time: Duration) -> Result<SyntheticWorker> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding a synthetic worker")?;
    let url = format!("http://{}", listener.local_addr()?);
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(SERVICE_NAME, tonic_health::ServingStatus::Serving)
        .await;
    let worker = Synthetic {
        service_time,
        device: Arc::new(Semaphore::new(1)),
        generations: Arc::new(AtomicU64::new(0)),
        png: Arc::new(tiny_png()?),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(async move {
        let _health = health;
        let served = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(WorkerServer::new(worker))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "synthetic worker stopped");
        }
    });
    Ok(SyntheticWorker { url, _stop: stop })
}
