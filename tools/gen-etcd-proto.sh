#!/bin/sh
# Regenerates src/vip/etcdpb.rs (prost message types for etcd's v3 API) from
# tools/etcd-proto/etcd.proto. Only needed when that .proto changes: the
# generated file is committed so building apilb never needs protoc.
# Needs: protoc (Debian: apt-get install protobuf-compiler) and cargo.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
cargo run --quiet --manifest-path "$root/tools/etcd-proto/gen/Cargo.toml" \
    --target-dir "${CARGO_TARGET_DIR:-$root/target}/gen-etcd-proto" -- \
    "$root/tools/etcd-proto" "$root/src/vip/etcdpb.rs"
rustfmt --edition 2021 "$root/src/vip/etcdpb.rs"
echo "wrote src/vip/etcdpb.rs"
