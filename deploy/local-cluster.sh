#!/usr/bin/env bash
# A local 3-node cluster on loopback addresses 127.0.20.1-3, data in
# ./cluster-data/nodeN, virtual host `localhost`. Ctrl-C stops all three.
#
#   deploy/local-cluster.sh            # builds in release, starts, prints status
#   clusterctl --node 127.0.20.2:5290 status
#
# Each node: c2s 5222/5223, admin 5290, cluster 5291 on its own address.
# Node 1 starts the cluster; nodes 2 and 3 join through it. Inter-node
# traffic is mutual TLS with a cluster CA made once by `clusterctl certs
# init` into $DATA/certs (PLAIN=1: without TLS, as loopback allows).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
BIN=target/release
DATA=${DATA:-./cluster-data}
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
tls=()
if [ -z "${PLAIN:-}" ]; then
    if [ ! -f "$DATA/certs/ca.crt" ]; then
        "$BIN/clusterctl" certs init --dir "$DATA/certs" \
            --node 1=127.0.20.1 --node 2=127.0.20.2 --node 3=127.0.20.3 >/dev/null
    fi
fi
for i in 1 2 3; do
    if [ -z "${PLAIN:-}" ]; then
        tls=(--cluster-ca "$DATA/certs/ca.crt" --cluster-cert "$DATA/certs/node-$i.crt"
            --cluster-key "$DATA/certs/node-$i.key")
    fi
    ip=127.0.20.$i
    mkdir -p "$DATA/node$i"
    join=()
    if [ "$i" -ne 1 ]; then join=(--join 127.0.20.1:5291); fi
    "$BIN/xmpp-node" --node-id "$i" --data-dir "$DATA/node$i" \
        --c2s-addr "$ip:5222" --c2s-tls-addr "$ip:5223" --s2s-addr "$ip:5269" \
        --http-addr "$ip:5280" --https-addr "$ip:5281" --grpc-addr "$ip:5290" --cluster-addr "$ip:5291" \
        "${join[@]}" "${tls[@]}" 2>"$DATA/node$i.log" &
    pids+=($!)
    # The first node must be up before the others ask it to admit them.
    for _ in $(seq 100); do
        "$BIN/clusterctl" --node "$ip:5290" status >/dev/null 2>&1 && break
        sleep 0.2
    done
done
"$BIN/clusterctl" --node 127.0.20.1:5290 status
echo
echo "three nodes running (logs in $DATA/node*.log); Ctrl-C stops them"
wait
