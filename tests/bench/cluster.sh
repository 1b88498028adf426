#!/usr/bin/env bash
# The cluster benchmark: logins/s and login latency, and committed writes/s
# and commit latency (xmpp-load writes: roster sets, one replicated write
# each, one in flight per user), on one node, then on a 3-node cluster
# through the leader and through a follower. A login is TCP,
# STARTTLS, SCRAM-SHA-1, bind (one Raft write: the session table), roster
# get, initial presence (one Raft write: availability), close (one Raft
# write: unbind), so the difference between the rows is the cost of
# replication on the login path.
#
#   tests/bench/cluster.sh [--users N] [--secs S] [--concurrency C]
#                          [--chat-users N] [--chat-rates R1,R2,...]
#
# Nodes listen on 127.0.30.1-3 with data in a temporary directory; no CPU
# pinning (three nodes and xmpp-load share this machine's cores), so read
# the rows against each other, not against the single-server table of
# tests/bench/run.sh. Prints Markdown tables.
#
# Messages: --chat-users users send chat messages at each of --chat-rates
# per second in total (comma-separated), three ways: every user on one
# follower; users on both followers, each message to a user of the
# sender's own node (xmpp-load --within-server); users on both followers,
# each message to a user of the other node. CPU is the sum of all three
# nodes, so the last row carries the cost of the hop between nodes, and
# the middle row is the baseline with the same spread of users over
# processes.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
USERS=500
SECS=10
CONC=50
CHAT_USERS=800
CHAT_RATES=2000,16000
while [ $# -gt 0 ]; do
    case $1 in
        --users) USERS=$2; shift 2 ;;
        --secs) SECS=$2; shift 2 ;;
        --concurrency) CONC=$2; shift 2 ;;
        --chat-users) CHAT_USERS=$2; shift 2 ;;
        --chat-rates) CHAT_RATES=$2; shift 2 ;;
        -h|--help) sed -n 2,23p "$0"; exit 0 ;;
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
DOMAIN=bench.test

start() { # id, join...
    local i=$1; shift
    local ip=127.0.30.$i
    mkdir -p "$TMP/n$i"
    "$BIN/xmpp-node" --node-id "$i" --data-dir "$TMP/n$i" --vhost "$DOMAIN" \
        --c2s-addr "$ip:5222" --c2s-tls-addr "$ip:5223" --grpc-addr "$ip:5290" \
        --s2s-addr "$ip:5269" --http-addr "$ip:5280" --https-addr "$ip:5281" \
        --cluster-addr "$ip:5291" --log-level warn \
        --stanzas-per-second 1000000 --stanza-burst 1000000 --mam-enabled false \
        --max-unauthenticated 100000 --max-unauthenticated-per-address 100000 "$@" 2>"$TMP/n$i.log" &
    pids+=($!)
    nodepid[$i]=$!
    for _ in $(seq 150); do
        "$BIN/clusterctl" --node "$ip:5290" status >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "node $i did not come up: $(tail -5 "$TMP/n$i.log")" >&2
    exit 1
}
stop_all() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; pids=(); rm -rf "$TMP"/n*; }

"$BIN/xmpp-load" accounts --users "$(( USERS > CHAT_USERS ? USERS : CHAT_USERS ))" --domain "$DOMAIN" >"$TMP/accounts.txt"

pid_of() { # node id -> pid
    echo "${nodepid[$1]}"
}

login() { # c2s address, node id -> "per_s p50 p99 failed cpu_ms"
    "$BIN/xmpp-load" login --server "$1" --domain "$DOMAIN" --accounts "$TMP/accounts.txt" \
        --users "$USERS" --mechanism scram-sha-1 --concurrency "$CONC" --arrival-rate 0 \
        --duration "$SECS" --server-pid "$(pid_of "$2")" --json --quiet |
        /usr/bin/python3 -c 'import json,sys; r=json.load(sys.stdin)["login"]; print("%.0f %.1f %.1f %d %.2f" % (r["per_s"], r["latency"]["p50_ms"], r["latency"]["p99_ms"], r["failed"], r.get("server_cpu_ms_per_login") or 0))'
}

writes() { # c2s address, node id, users -> "per_s p50 p99 failed cpu_ms"
    "$BIN/xmpp-load" writes --server "$1" --domain "$DOMAIN" --accounts "$TMP/accounts.txt" \
        --users "$3" --duration "$SECS" --server-pid "$(pid_of "$2")" --json --quiet |
        /usr/bin/python3 -c 'import json,sys; r=json.load(sys.stdin)["writes"]; print("%.0f %.2f %.2f %d %.3f" % (r["per_s"], r["latency"]["p50_ms"], r["latency"]["p99_ms"], r["failed"], r.get("server_cpu_ms_per_write") or 0))'
}

chat() { # servers (comma-separated), pids (comma-separated), rate, options... -> "delivered_per_s p50 p99 lost cpu_ms"
    local servers=$1 pids=$2 rate=$3
    shift 3
    "$BIN/xmpp-load" chat --server "$servers" --domain "$DOMAIN" --accounts "$TMP/accounts.txt" \
        --users "$CHAT_USERS" --rate "$rate" --duration "$SECS" --arrival-rate 0 \
        --concurrency "$CONC" --server-pid "$pids" --json --quiet "$@" |
        /usr/bin/python3 -c 'import json,sys; r=json.load(sys.stdin)["chat"]; print("%.0f %.2f %.2f %d %.3f" % (r["delivered_per_s"], r["latency"]["p50_ms"], r["latency"]["p99_ms"], r["lost"], r.get("server_cpu_s_per_1000_messages") or 0))'
}

row() { read -r per p50 p99 failed cpu <<<"$2"; printf '| %s | %s | %s / %s | %s | %s |\n' "$1" "$per" "$p50" "$p99" "$cpu" "$failed"; }

start 1
"$BIN/clusterctl" --node 127.0.30.1:5290 import-users "$TMP/accounts.txt" >/dev/null
one=$(login 127.0.30.1:5222 1)
one_w1=$(writes 127.0.30.1:5222 1 1)
one_w=$(writes 127.0.30.1:5222 1 "$CONC")
stop_all

start 1
start 2 --join 127.0.30.1:5291
start 3 --join 127.0.30.1:5291
for _ in $(seq 100); do
    n=$("$BIN/clusterctl" --node 127.0.30.1:5290 status --json | /usr/bin/python3 -c 'import json,sys; print(sum(1 for m in json.load(sys.stdin)["members"] if m["role"]!="learner"))')
    [ "$n" = 3 ] && break
    sleep 0.2
done
"$BIN/clusterctl" --node 127.0.30.2:5290 import-users "$TMP/accounts.txt" >/dev/null
leader=$("$BIN/clusterctl" --node 127.0.30.1:5290 status --json | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["leader"])')
follower=$(( leader % 3 + 1 ))
via_leader=$(login "127.0.30.$leader:5222" "$leader")
via_follower=$(login "127.0.30.$follower:5222" "$follower")
lw1=$(writes "127.0.30.$leader:5222" "$leader" 1)
lw=$(writes "127.0.30.$leader:5222" "$leader" "$CONC")
fw=$(writes "127.0.30.$follower:5222" "$follower" "$CONC")
other=$(( follower % 3 + 1 ))
[ "$other" = "$leader" ] && other=$(( other % 3 + 1 ))
all="${nodepid[1]},${nodepid[2]},${nodepid[3]}"
declare -A same within cross
IFS=, read -r -a rates <<<"$CHAT_RATES"
for rate in "${rates[@]}"; do
    same[$rate]=$(chat "127.0.30.$follower:5222" "$all" "$rate")
    within[$rate]=$(chat "127.0.30.$follower:5222,127.0.30.$other:5222" "$all" "$rate" --within-server)
    cross[$rate]=$(chat "127.0.30.$follower:5222,127.0.30.$other:5222" "$all" "$rate")
done

echo "Logins ($USERS accounts, $CONC in flight, ${SECS} s each, SCRAM-SHA-1 over STARTTLS), $(date -u +%F):"
echo
echo "| | logins/s | latency p50 / p99 (ms) | CPU-ms per login (that node) | failed |"
echo "|---|---:|---:|---:|---:|"
row "one node" "$one"
row "3-node cluster, via the leader" "$via_leader"
row "3-node cluster, via a follower" "$via_follower"
echo
echo "Committed writes (roster sets, one in flight per user, ${SECS} s each):"
echo
echo "| | writes/s | commit latency p50 / p99 (ms) | CPU-ms per write (that node) | failed |"
echo "|---|---:|---:|---:|---:|"
row "one node, 1 user" "$one_w1"
row "one node, $CONC users" "$one_w"
row "3-node cluster, via the leader, 1 user" "$lw1"
row "3-node cluster, via the leader, $CONC users" "$lw"
row "3-node cluster, via a follower, $CONC users" "$fw"
echo
echo "Messages ($CHAT_USERS users, ${SECS} s a row, 3-node cluster; CPU of all three nodes):"
echo
echo "| offered/s | | delivered/s | latency p50 / p99 (ms) | CPU-ms per message (all nodes) | lost |"
echo "|---:|---|---:|---:|---:|---:|"
for rate in "${rates[@]}"; do
    row "$rate | same node (every user on one follower)" "${same[$rate]}"
    row "$rate | same node (users on two followers, each message within its node)" "${within[$rate]}"
    row "$rate | across nodes (users on two followers, every message to the other)" "${cross[$rate]}"
done
echo
echo "Across nodes ÷ same node, CPU per message:"
echo
echo "| offered/s | ÷ users on two followers | ÷ every user on one follower |"
echo "|---:|---:|---:|"
for rate in "${rates[@]}"; do
    /usr/bin/python3 -c 'import sys; c,w,s=(float(a.split()[4]) for a in sys.argv[2:5]); print("| %s | %.2f× | %.2f× |" % (sys.argv[1], c/w if w else 0, c/s if s else 0))' \
        "$rate" "${cross[$rate]}" "${within[$rate]}" "${same[$rate]}"
done
