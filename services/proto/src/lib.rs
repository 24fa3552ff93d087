//! The gRPC contract of MIP Cluster: the `mip.v1` package generated from `proto/mip/v1/*.proto`, and its encoded
//! descriptor set for gRPC reflection.

#![allow(clippy::all, missing_docs)]

/// `mip.v1`: messages, the `Worker` and `Coordinator` clients and servers.
pub mod v1 {
    tonic::include_proto!("mip.v1");
}

/// Encoded `FileDescriptorSet` of every mip.v1 proto (for `tonic-reflection`).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mip_descriptor.bin"));
