//! gRPC server reflection as the common clients use it: `grpc.reflection.v1` (recent grpcurl, grpc-go) and
//! `grpc.reflection.v1alpha` (grpcurl ≤ 1.8.6, Python's grpcio-reflection), on the worker and on the coordinator.
//! Each version lists the service, health and both reflection services, and describes the service's methods.

use std::net::SocketAddr;

use mip_tests::*;
use tonic::transport::Channel;

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect")
}

/// One reflection round trip in version `$v` (a module of `tonic_reflection::pb`): the listed services and the
/// names of the files describing `$symbol`.
macro_rules! reflect {
    ($v:ident, $addr:expr, $symbol:expr) => {{
        use tonic_reflection::pb::$v::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$v::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$v::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::$v::ServerReflectionRequest;

        let ask = |m: MessageRequest| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(m),
        };
        let reqs = vec![
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol($symbol.to_owned())),
        ];
        let mut stream = ServerReflectionClient::new(channel($addr).await)
            .server_reflection_info(tokio_stream::iter(reqs))
            .await
            .expect(concat!("reflection ", stringify!($v)))
            .into_inner();
        let (mut services, mut files) = (Vec::new(), Vec::new());
        while let Some(resp) = stream.message().await.expect("reflection message") {
            match resp.message_response {
                Some(MessageResponse::ListServicesResponse(l)) => {
                    services.extend(l.service.into_iter().map(|s| s.name))
                }
                Some(MessageResponse::FileDescriptorResponse(f)) => files.extend(f.file_descriptor_proto),
                other => panic!("unexpected reflection answer: {other:?}"),
            }
        }
        services.sort();
        (services, files)
    }};
}

fn check(services: &[String], files: &[Vec<u8>], service: &str, method: &str) {
    for s in [
        service,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.iter().any(|x| x == s), "{s} not listed: {services:?}");
    }
    assert!(!files.is_empty(), "{service} is described");
    let described = files
        .iter()
        .any(|f| f.windows(method.len()).any(|w| w == method.as_bytes()));
    assert!(described, "the descriptors of {service} name its method {method}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_reflection_versions_on_both_services() {
    let redis = RedisServer::start();
    let ws = workers(1).await;
    let coord = Coord::start(&ws, &redis, |_| {}).await;
    let worker = ws[0].addr;

    let (s, f) = reflect!(v1, worker, "mip.v1.Worker");
    check(&s, &f, "mip.v1.Worker", "EncodeSubjects");
    let (s, f) = reflect!(v1alpha, worker, "mip.v1.Worker");
    check(&s, &f, "mip.v1.Worker", "EncodeSubjects");
    let (s, f) = reflect!(v1, coord.addr, "mip.v1.Coordinator");
    check(&s, &f, "mip.v1.Coordinator", "SubmitJob");
    let (s, f) = reflect!(v1alpha, coord.addr, "mip.v1.Coordinator");
    check(&s, &f, "mip.v1.Coordinator", "SubmitJob");

    coord.stop().await;
    for w in ws {
        w.stop().await;
    }
}
