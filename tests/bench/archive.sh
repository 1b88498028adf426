#!/usr/bin/env bash
# The message archive's cost (XEP-0313): server CPU per chat message with
# the archive on and off, archive bytes per message on disk, and query
# latency on one deep archive.
#
#   tests/bench/archive.sh [--users N] [--rate R] [--secs S] [--deep N]
#
# One node on 127.0.33.1 with data in a temporary directory, nothing
# pinned (the node and the load generator share the cores): read the rows
# against each other. --deep is the number of messages user1 and user2
# exchange for the deep archive (each is archived for both, so user1's
# archive holds that many). Prints Markdown.
set -euo pipefail
USERS=200
RATE=2000
SECS=10
DEEP=100000
while [ $# -gt 0 ]; do
    case $1 in
        --users) USERS=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --secs) SECS=$2; shift 2 ;;
        --deep) DEEP=$2; shift 2 ;;
        -h|--help) sed -n 2,13p "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
IP=127.0.33.1
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

start() { # name, mam enabled
    mkdir -p "$TMP/$1"
    node_config "$TMP/$1" "[mam]
enabled = $2
max_messages_per_user = 1000000" >"$TMP/$1.toml"
    start_node "$TMP/$1.toml" "$TMP/$1.log"
}
stop() { stop_node; }
chat() { # users, rate, secs -> "delivered_per_s p50 p99 lost cpu_s_per_1000 sent"
    "$BIN/xmpp-load" chat --server "$IP:5222" --domain bench.test --accounts "$TMP/accounts.txt" \
        --mechanism scram-sha-1 --users "$1" --rate "$2" --duration "$3" \
        --arrival-rate 0 --concurrency 50 --server-pid "$NODE" --json --quiet |
        /usr/bin/python3 -c 'import json,sys; r=json.load(sys.stdin)["chat"]; print("%.0f %.2f %.2f %d %.4f %d" % (r["delivered_per_s"], r["latency"]["p50_ms"], r["latency"]["p99_ms"], r["lost"], r.get("server_cpu_s_per_1000_messages") or 0, r["sent"]))'
}

"$BIN/xmpp-load" accounts --users "$USERS" --domain bench.test >"$TMP/accounts.txt"
rows=()
for mam in false true; do
    start "mam-$mam" "$mam"
    "$BIN/clusterctl" --node "$IP:5290" import-users "$TMP/accounts.txt" >/dev/null
    stop
    before=$(du -sb "$TMP/mam-$mam" | cut -f1)
    start "mam-$mam" "$mam"
    r=$(chat "$USERS" "$RATE" "$SECS")
    stop
    after=$(du -sb "$TMP/mam-$mam" | cut -f1)
    read -r per p50 p99 lost cpu sent <<<"$r"
    rows+=("| archive $([ "$mam" = true ] && echo on || echo off) | $per | $p50 / $p99 | $cpu | $(( (after - before) / sent )) | $lost |")
done

# The deep archive: user1 and user2 only, DEEP messages in all.
start deep true
"$BIN/clusterctl" --node "$IP:5290" import-users "$TMP/accounts.txt" >/dev/null
# 500 msg/s (250 per user): each session waits for its message's archive
# entry to commit before routing the next (in order), so one session sends
# at most about one message per commit latency plus mam.batch_ms.
DEEP_SECS=$(( DEEP / 500 ))
chat 2 500 "$DEEP_SECS" >/dev/null
probe=$("$BIN/mam-probe" --server "$IP:5222" --domain bench.test --user user1 --password pw1 \
    --with user2@bench.test --rounds 200 --max 50)

echo
echo "one node, $USERS users chatting at $RATE msg/s for ${SECS}s ($(date -u +%F))"
echo
echo "| | delivered/s | latency p50 / p99 ms | server CPU-ms per message | disk bytes per message | lost |"
echo "|---|---:|---:|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
echo
echo "queries on one archive ($DEEP_SECS s of 500 msg/s between two users), 50 results a page:"
echo
echo '```'
echo "$probe"
echo '```'
