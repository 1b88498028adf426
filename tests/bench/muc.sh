#!/usr/bin/env bash
# Group chat fan-out (XEP-0045): one room of --occupants, one sender at
# --rate messages/s; copies delivered per second and server CPU per
# delivered copy (each message is one replicated write, then a copy per
# occupant). One node on 127.0.35.1, nothing pinned; prints the figures.
#
#   tests/bench/muc.sh [--occupants N] [--messages M] [--rate R]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OCC=100
MSGS=2000
RATE=50
while [ $# -gt 0 ]; do
    case $1 in
        --occupants) OCC=$2; shift 2 ;;
        --messages) MSGS=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        -h|--help) sed -n 2,8p "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
cd "$ROOT"
cargo build --release -q -p node -p tests --bins
BIN=$ROOT/target/release
TMP=$(mktemp -d)
IP=127.0.35.1
NODE=
cleanup() { [ -n "$NODE" ] && kill "$NODE" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
mkdir -p "$TMP/data"
cat >"$TMP/node.toml" <<TOML
node_id = 1
data_dir = "$TMP/data"
[[vhosts]]
name = "bench.test"
[listen]
c2s = "$IP:5222"
c2s_tls = "$IP:5223"
s2s = "$IP:5269"
http = "$IP:5280"
https = "$IP:5281"
grpc = "$IP:5290"
[cluster]
addr = "$IP:5291"
[limits]
stanzas_per_second = 1000000
stanza_burst = 1000000
max_unauthenticated = 100000
max_unauthenticated_per_address = 100000
[muc]
max_occupants = 100000
messages_per_second = 1000000
message_burst = 1000000
[log]
level = "warn"
TOML
"$BIN/xmpp-node" --config "$TMP/node.toml" 2>"$TMP/node.log" &
NODE=$!
for _ in $(seq 150); do
    "$BIN/clusterctl" --node "$IP:5290" status >/dev/null 2>&1 && break
    sleep 0.2
done
"$BIN/xmpp-load" accounts --users "$OCC" --domain bench.test >"$TMP/accounts.txt"
"$BIN/clusterctl" --node "$IP:5290" import-users "$TMP/accounts.txt" >/dev/null
echo "($(date -u +%F), $OCC occupants, $MSGS messages at $RATE/s)"
"$BIN/muc-bench" --server "$IP:5222" --domain bench.test --occupants "$OCC" \
    --messages "$MSGS" --rate "$RATE" --server-pid "$NODE"
