//! Test support (feature `testing`): an in-process worker on 127.0.0.1:0 over the fixture model, and small gRPC
//! helpers for the tests of this crate and of the cross-service suite.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::WorkerConfig;
use crate::server::{run_with, RunOptions};
use mip_proto::v1::worker_client::WorkerClient;
use mip_proto::v1::{
    generate_event, GenerateEvent, GenerateTask, GenerationRequest, Image, InfoRequest, Subject, WorkerInfo,
};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::Streaming;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Upper bound of any wait in these tests (model load on a slow machine included).
pub const BOUND: Duration = Duration::from_secs(120);

/// A worker running in this process.
pub struct TestWorker {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

/// A model bundle (`mip.json`) in `dir` pointing at the fixture's `sdxl` variant.
pub fn fixture_bundle(dir: &std::path::Path) {
    write_bundle(dir, false);
}

/// [`fixture_bundle`] with the tiny evaluation models of `tests/fixtures/mip-tiny-eval` (a worker that scores).
pub fn fixture_bundle_scoring(dir: &std::path::Path) {
    write_bundle(dir, true);
}

/// The tiny evaluation fixtures (`tests/fixtures/mip-tiny-eval`, beside the model fixtures).
pub fn eval_fixtures_dir() -> std::path::PathBuf {
    let fixtures = crate::parity::fixtures_dir().unwrap_or_else(|e| panic!("{e}"));
    fixtures.join("../mip-tiny-eval")
}

fn write_bundle(dir: &std::path::Path, scoring: bool) {
    let fixtures = crate::parity::fixtures_dir().unwrap_or_else(|e| panic!("{e}"));
    let mut manifest = serde_json::json!({
        "base": fixtures.join("sdxl"),
        "image_encoder": fixtures.join("image_encoder"),
        "adapter": fixtures.join("adapter/mip_sdxl_2obj.safetensors"),
        "default_size": [64, 64],
    });
    if scoring {
        let eval = eval_fixtures_dir();
        manifest["eval"] = serde_json::json!({"clip": eval.join("clip"), "dino": eval.join("dino")});
    }
    std::fs::write(dir.join("mip.json"), manifest.to_string()).expect("manifest");
}

impl TestWorker {
    /// Starts a worker on the fixture model; `edit` adjusts its config (Redis URL, TLS, capacity…).
    pub async fn start(edit: impl FnOnce(&mut WorkerConfig)) -> Self {
        Self::start_with(edit, None).await
    }

    /// Like [`start`](Self::start); with `gate`, model loading waits until the gate's sender fires.
    pub async fn start_with(edit: impl FnOnce(&mut WorkerConfig), gate: Option<oneshot::Receiver<()>>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::start_on(listener, edit, gate)
    }

    /// Starts a worker on the fixture model with the tiny evaluation models (it can score).
    pub async fn start_scoring(edit: impl FnOnce(&mut WorkerConfig)) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::start_bundle(listener, edit, None, true)
    }

    /// Like [`start_with`](Self::start_with), on a listener of the caller's choosing (a worker that comes back on
    /// the port of one that stopped).
    pub fn start_on(
        listener: tokio::net::TcpListener,
        edit: impl FnOnce(&mut WorkerConfig),
        gate: Option<oneshot::Receiver<()>>,
    ) -> Self {
        Self::start_bundle(listener, edit, gate, false)
    }

    fn start_bundle(
        listener: tokio::net::TcpListener,
        edit: impl FnOnce(&mut WorkerConfig),
        gate: Option<oneshot::Receiver<()>>,
        scoring: bool,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        write_bundle(dir.path(), scoring);
        let mut config = WorkerConfig::default();
        config.model.path = dir.path().display().to_string();
        config.server.drain_seconds = 10;
        config.server.worker_id = "test-worker".into();
        edit(&mut config);
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async {
            let _ = stopped.await;
        };
        let task = tokio::spawn(run_with(
            config,
            listener,
            shutdown,
            RunOptions {
                load_gate: gate,
                metrics: None,
            },
        ));
        Self {
            addr,
            stop: Some(stop),
            task,
            _dir: dir,
        }
    }

    /// A plain-text client, waiting (bounded) until the port accepts.
    pub async fn client(&self) -> WorkerClient<Channel> {
        WorkerClient::new(self.channel().await)
    }

    pub async fn channel(&self) -> Channel {
        let url = format!("http://{}", self.addr);
        tokio::time::timeout(BOUND, async {
            loop {
                if let Ok(c) = Channel::from_shared(url.clone()).expect("url").connect().await {
                    return c;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("worker reachable")
    }

    /// The health of `mip.v1.Worker`.
    pub async fn health(&self) -> ServingStatus {
        let req = HealthCheckRequest {
            service: "mip.v1.Worker".into(),
        };
        let r = HealthClient::new(self.channel().await)
            .check(req)
            .await
            .expect("health check");
        r.into_inner().status()
    }

    /// Waits (bounded) until health says SERVING.
    pub async fn wait_serving(&self) {
        tokio::time::timeout(BOUND, async {
            while self.health().await != ServingStatus::Serving {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("SERVING within the bound");
    }

    /// Asks the worker to shut down without waiting for it.
    pub fn request_stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Stops the worker and waits for `run` to return Ok.
    pub async fn stop(mut self) {
        self.request_stop();
        let r = tokio::time::timeout(BOUND, self.task).await.expect("stops in time");
        r.expect("join").expect("run returns Ok");
    }
}

/// A reference image of the fixture's `sdxl_two_objects` case.
pub fn image(name: &str) -> Vec<u8> {
    let p = crate::parity::fixtures_dir()
        .unwrap_or_else(|e| panic!("{e}"))
        .join("cases/sdxl_two_objects/refs")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn subject(name: &str, images: Vec<Vec<u8>>) -> Subject {
    Subject {
        name: name.into(),
        images,
        subject_key: String::new(),
    }
}

/// A small generation task.
pub fn task(side: u32, steps: u32, subjects: Vec<Subject>) -> GenerateTask {
    GenerateTask {
        task_id: "t".into(),
        request: Some(GenerationRequest {
            prompt: "a cat wearing a jacket".into(),
            subjects,
            width: side,
            height: side,
            steps,
            seed: Some(3),
            ..Default::default()
        }),
    }
}

pub async fn info(c: &mut WorkerClient<Channel>) -> WorkerInfo {
    c.info(InfoRequest {}).await.expect("info").into_inner()
}

/// Reads a whole Generate stream: the progress steps seen and the final image or the error.
pub async fn collect(mut s: Streaming<GenerateEvent>) -> (Vec<u32>, Result<Image, tonic::Status>) {
    let mut steps = Vec::new();
    loop {
        match tokio::time::timeout(BOUND, s.message()).await.expect("stream bounded") {
            Ok(Some(GenerateEvent {
                event: Some(generate_event::Event::Progress(p)),
            })) => steps.push(p.step),
            Ok(Some(GenerateEvent {
                event: Some(generate_event::Event::Image(img)),
            })) => return (steps, Ok(img)),
            Ok(Some(_)) => panic!("empty event"),
            Ok(None) => return (steps, Err(tonic::Status::internal("stream ended without an image"))),
            Err(e) => return (steps, Err(e)),
        }
    }
}

/// Runs one Generate call to the end.
pub async fn generate(c: &mut WorkerClient<Channel>, t: GenerateTask) -> (Vec<u32>, Result<Image, tonic::Status>) {
    match c.generate(t).await {
        Ok(s) => collect(s.into_inner()).await,
        Err(e) => (Vec::new(), Err(e)),
    }
}
