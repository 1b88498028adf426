#!/usr/bin/env bash
# The federation benchmark: chat messages delivered per second and server
# CPU per message between two domains (a.test on one node, b.test on
# another, one s2s stream each way, dialback over STARTTLS), beside the
# same load within one domain on one node (c2s only).
#
#   tests/bench/s2s.sh [--users N] [--rate R] [--secs S]
#
# Nodes listen on 127.0.31.1 and 127.0.31.2 with data in a temporary
# directory; no CPU pinning (two nodes and xmpp-load share this machine's
# cores), so read the rows against each other. Prints a Markdown table.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
USERS=200
RATE=2000
SECS=10
while [ $# -gt 0 ]; do
    case $1 in
        --users) USERS=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --secs) SECS=$2; shift 2 ;;
        -h|--help) sed -n 2,11p "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
cd "$ROOT"
cargo build --release -q -p node -p tests --bins
BIN=$ROOT/target/release
TMP=$(mktemp -d)
pids=()
declare -A nodepid
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

start() { # i, domain, other domain, other ip
    local i=$1 domain=$2 other=$3 other_ip=$4 ip=127.0.31.$1
    mkdir -p "$TMP/n$i"
    cat >"$TMP/n$i.toml" <<TOML
node_id = 1
data_dir = "$TMP/n$i"
[[vhosts]]
name = "$domain"
[listen]
c2s = "$ip:5222"
c2s_tls = "$ip:5223"
s2s = "$ip:5269"
http = "$ip:5280"
https = "$ip:5281"
grpc = "$ip:5290"
[cluster]
addr = "$ip:5291"
[mam]
# Without the archive, like Prosody's and ejabberd's Debian defaults and
# the figures in the README; tests/bench/archive.sh measures its cost.
enabled = false
[limits]
stanzas_per_second = 1000000
stanza_burst = 1000000
max_unauthenticated = 100000
max_unauthenticated_per_address = 100000
[log]
level = "warn"
[s2s.routes]
"$other" = ["$other_ip:5269"]
TOML
    "$BIN/xmpp-node" --config "$TMP/n$i.toml" 2>"$TMP/n$i.log" &
    pids+=($!)
    nodepid[$i]=$!
    for _ in $(seq 150); do
        "$BIN/clusterctl" --node "$ip:5290" status >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "node $i did not come up: $(tail -5 "$TMP/n$i.log")" >&2
    exit 1
}

"$BIN/xmpp-load" accounts --users "$USERS" --domain a.test >"$TMP/a.txt"
sed 's/@a\.test;/@b.test;/' "$TMP/a.txt" >"$TMP/b.txt"
sed 's/@a\.test;/;/' "$TMP/a.txt" >"$TMP/plain.txt"
start 1 a.test b.test 127.0.31.2
start 2 b.test a.test 127.0.31.1
"$BIN/clusterctl" --node 127.0.31.1:5290 import-users "$TMP/a.txt" >/dev/null
"$BIN/clusterctl" --node 127.0.31.2:5290 import-users "$TMP/b.txt" >/dev/null

chat() { # servers, domains, pids -> "delivered_per_s p50 p99 lost cpu_s_per_1000"
    "$BIN/xmpp-load" chat --server "$1" --domain "$2" --accounts "$TMP/plain.txt" \
        --users "$USERS" --rate "$RATE" --duration "$SECS" --arrival-rate 0 \
        --concurrency 50 --server-pid "$3" --json --quiet |
        /usr/bin/python3 -c 'import json,sys; r=json.load(sys.stdin)["chat"]; print("%.0f %.2f %.2f %d %.3f" % (r["delivered_per_s"], r["latency"]["p50_ms"], r["latency"]["p99_ms"], r["lost"], r.get("server_cpu_s_per_1000_messages") or 0))'
}
row() { read -r per p50 p99 lost cpu <<<"$2"; printf '| %s | %s | %s / %s | %s | %s |\n' "$1" "$per" "$p50" "$p99" "$cpu" "$lost"; }

same=$(chat 127.0.31.1:5222 a.test "${nodepid[1]}")
cross=$(chat 127.0.31.1:5222,127.0.31.2:5222 a.test,b.test "${nodepid[1]},${nodepid[2]}")
echo
echo "chat, $USERS users, $RATE msg/s offered, ${SECS}s ($(date -u +%F))"
echo
echo "| | delivered/s | latency p50 / p99 ms | CPU-ms per message (all nodes) | lost |"
echo "|---|---:|---:|---:|---:|"
row "one domain, one node (c2s only)" "$same"
row "a.test ↔ b.test over s2s (two nodes)" "$cross"
"$BIN/clusterctl" --node 127.0.31.1:5290 s2s
