//! Generated gRPC types and services for the cluster (see `proto/cluster.proto`).

#![allow(clippy::all, missing_docs)]

/// The `cluster` protobuf package.
pub mod cluster {
    tonic::include_proto!("cluster");
}

pub use cluster::*;
