//! gRPC server reflection, in both versions clients use: `grpc.reflection.v1` (grpcurl ≥ 1.8.7, grpc-go, recent
//! tools) and `grpc.reflection.v1alpha` (grpcurl ≤ 1.8.6, Google's Python `grpcio-reflection`, many CI images).
//! Both serve the same descriptors: the service's own, `grpc.health.v1` and both reflection protocols, so either
//! version lists every service the server has.

use tonic_reflection::server::{v1, v1alpha, Builder, Error};

/// The two reflection services over `descriptor_sets` (encoded `FileDescriptorSet`s) and the health protocol.
pub fn services(
    descriptor_sets: &[&'static [u8]],
) -> Result<
    (
        v1::ServerReflectionServer<impl v1::ServerReflection>,
        v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>,
    ),
    Error,
> {
    let common = [
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let builder = || {
        common
            .iter()
            .chain(descriptor_sets)
            .fold(Builder::configure().include_reflection_service(false), |b, set| {
                b.register_encoded_file_descriptor_set(set)
            })
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}
