#!/usr/bin/env bash
# The HTTP transports' cost beside TCP: server CPU per chat message and
# memory per held session, over TCP (STARTTLS) and over WebSocket (RFC 7395,
# wss:// on the HTTPS port, one element per frame as browsers send).
#
#   tests/bench/http.sh [--users N] [--rate R] [--secs S] [--hold N]
#
# One node on 127.0.32.1 with data in a temporary directory; each hold run
# gets a freshly started node, so its RSS growth is that run's alone. No
# CPU pinning (the node and xmpp-load share this machine's cores): read
# the rows against each other. Prints a Markdown table.
set -euo pipefail
USERS=200
RATE=2000
SECS=10
HOLD=1000
while [ $# -gt 0 ]; do
    case $1 in
        --users) USERS=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --secs) SECS=$2; shift 2 ;;
        --hold) HOLD=$2; shift 2 ;;
        -h|--help) sed -n 2,11p "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
IP=127.0.32.1
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
mkdir -p "$TMP/data"
# Without the archive, like Prosody's and ejabberd's Debian defaults and
# the figures in the README; tests/bench/archive.sh measures its cost.
node_config "$TMP/data" "[mam]
enabled = false" >"$TMP/node.toml"
start() { start_node "$TMP/node.toml" "$TMP/node.log"; }
stop() { stop_node; }

N=$((USERS > HOLD ? USERS : HOLD))
"$BIN/xmpp-load" accounts --users "$N" --domain bench.test >"$TMP/accounts.txt"
start
"$BIN/clusterctl" --node "$IP:5290" import-users "$TMP/accounts.txt" >/dev/null

# transport flags... -> "delivered_per_s p50 p99 lost cpu_s_per_1000"
chat() {
    "$BIN/xmpp-load" chat "$@" --domain bench.test --accounts "$TMP/accounts.txt" \
        --mechanism scram-sha-1 --users "$USERS" --rate "$RATE" --duration "$SECS" \
        --arrival-rate 0 --concurrency 50 --server-pid "$NODE" --json --quiet |
        /usr/bin/python3 -c 'import json,sys; r=json.load(sys.stdin)["chat"]; print("%.0f %.2f %.2f %d %.3f" % (r["delivered_per_s"], r["latency"]["p50_ms"], r["latency"]["p99_ms"], r["lost"], r.get("server_cpu_s_per_1000_messages") or 0))'
}
# transport flags... -> "kib_per_connection rss_before rss_after alive"
hold() {
    "$BIN/xmpp-load" hold "$@" --domain bench.test --accounts "$TMP/accounts.txt" \
        --mechanism scram-sha-1 --users "$HOLD" --duration 5 --arrival-rate 0 \
        --concurrency 50 --server-pid "$NODE" --json --quiet |
        /usr/bin/python3 -c 'import json,sys; h=json.load(sys.stdin)["hold"]; print("%.1f %d %d %d" % (h["server_kib_per_connection"], h["server_rss_before_kib"] // 1024, h["server_rss_after_kib"] // 1024, h["alive_at_end"]))'
}
TCP=(--server "$IP:5222" --transport tcp --tls starttls)
WS=(--server "$IP:5281" --transport websocket --tls direct)

chat_tcp=$(chat "${TCP[@]}")
chat_ws=$(chat "${WS[@]}")
stop
start
hold_tcp=$(hold "${TCP[@]}")
stop
start
hold_ws=$(hold "${WS[@]}")

echo
echo "one node, $USERS users chatting at $RATE msg/s for ${SECS}s; $HOLD sessions held ($(date -u +%F))"
echo
echo "| | delivered/s | latency p50 / p99 ms | server CPU-ms per message | lost |"
echo "|---|---:|---:|---:|---:|"
for r in "TCP (STARTTLS)|$chat_tcp" "WebSocket (wss)|$chat_ws"; do
    read -r per p50 p99 lost cpu <<<"${r#*|}"
    printf '| %s | %s | %s / %s | %s | %s |\n' "${r%%|*}" "$per" "$p50" "$p99" "$cpu" "$lost"
done
echo
echo "| $HOLD held sessions | server KiB per session | server RSS before → holding (MiB) | alive at end |"
echo "|---|---:|---:|---:|"
for r in "TCP (STARTTLS)|$hold_tcp" "WebSocket (wss)|$hold_ws"; do
    read -r kib a b alive <<<"${r#*|}"
    printf '| %s | %s | %s → %s | %s |\n' "${r%%|*}" "$kib" "$a" "$b" "$alive"
done
