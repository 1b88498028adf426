#!/usr/bin/env bash
# What a login costs the server, by mechanism: server CPU per login and
# login latency for PLAIN, SCRAM-SHA-256 and FAST (XEP-0484 over SASL2
# with Bind2, `xmpp-load --mechanism fast`: each user logs in once with
# SCRAM to get a token, outside the measurement, then only with the token).
# Every login is a full one: TCP, STARTTLS, authentication, binding, roster
# get and initial presence, then the stream is closed.
#
#   tests/bench/login.sh [--users N] [--rate R] [--secs S]
#
# One node on 127.0.33.1 with data in a temporary directory, the archive
# off. No CPU pinning: read the rows against each other. Prints a
# Markdown table.
set -euo pipefail
USERS=500
RATE=200
SECS=10
while [ $# -gt 0 ]; do
    case $1 in
        --users) USERS=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --secs) SECS=$2; shift 2 ;;
        -h|--help) sed -n 2,13p "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
IP=127.0.33.1
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
mkdir -p "$TMP/data"
node_config "$TMP/data" "[mam]
enabled = false" >"$TMP/node.toml"
"$BIN/xmpp-load" accounts --users "$USERS" --domain bench.test >"$TMP/accounts.txt"
start_node "$TMP/node.toml" "$TMP/node.log"
"$BIN/clusterctl" --node "$IP:5290" import-users "$TMP/accounts.txt" >/dev/null

# mechanism -> "logins_per_s p50 p99 failed cpu_ms_per_login"
login() {
    "$BIN/xmpp-load" login --server "$IP:5222" --tls starttls --domain bench.test \
        --accounts "$TMP/accounts.txt" --mechanism "$1" --users "$USERS" \
        --arrival-rate "$RATE" --concurrency 100 --duration "$SECS" \
        --server-pid "$NODE" --json --quiet |
        /usr/bin/python3 -c 'import json,sys; r=json.load(sys.stdin)["login"]; print("%.0f %.1f %.1f %d %.2f" % (r["per_s"], r["latency"]["p50_ms"], r["latency"]["p99_ms"], r["failed"], r.get("server_cpu_ms_per_login") or 0))'
}

echo "| mechanism | logins/s | p50 ms | p99 ms | failed | server CPU-ms per login |"
echo "|---|---:|---:|---:|---:|---:|"
for m in plain scram-sha-256 fast; do
    read -r per_s p50 p99 failed cpu <<<"$(login "$m")"
    echo "| $m | $per_s | $p50 | $p99 | $failed | $cpu |"
done
echo
echo "$(date -u +%Y-%m-%d), $(nproc) cores, $USERS users, $RATE logins/s offered for ${SECS}s each."
