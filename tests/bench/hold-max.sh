#!/usr/bin/env bash
# The largest hold this machine allows: one node holding as many
# authenticated, idle TLS connections as its open-files limit leaves room
# for, each after STARTTLS, SCRAM-SHA-1, bind, roster get and initial
# presence; prints the connections held, the node's RSS before and after,
# KiB per connection, and what one million connections would take.
#
#   tests/bench/hold-max.sh [--conns N] [--processes P] [--source-ips A-B] [--secs S]
#
# Defaults: N = the open-files hard limit minus 1,000 (the node's own files:
# data, listeners, runtime), P = enough xmpp-load processes for N at the
# same limit (at least 2), source addresses 127.0.0.2-127.0.0.9 (past one
# address's ephemeral ports), a 10 s hold. The node runs on 127.0.35.1 with
# data in a temporary directory and the archive off; nothing is pinned.
# Everything it started is stopped on exit.
set -euo pipefail
HARD=$(ulimit -Hn)
[ "$HARD" = unlimited ] && HARD=1048576
CONNS=$((HARD - 1000))
PROCS=
SOURCES=127.0.0.2-127.0.0.9
SECS=10
while [ $# -gt 0 ]; do
    case $1 in
        --conns) CONNS=$2; shift 2 ;;
        --processes) PROCS=$2; shift 2 ;;
        --source-ips) SOURCES=$2; shift 2 ;;
        --secs) SECS=$2; shift 2 ;;
        -h|--help) sed -n 2,15p "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
# xmpp-load keeps 64 descriptors for itself (see its capacity check).
PER=$((HARD - 64))
[ -n "$PROCS" ] || PROCS=$(( (CONNS + PER - 1) / PER ))
[ "$PROCS" -ge 2 ] || PROCS=2
IP=127.0.35.1
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
mkdir -p "$TMP/data"
node_config "$TMP/data" "[mam]
enabled = false" >"$TMP/node.toml"
"$BIN/xmpp-load" accounts --users "$CONNS" --domain bench.test >"$TMP/accounts.txt"
start_node "$TMP/node.toml" "$TMP/node.log"
echo "node $NODE: open files $(awk '/Max open files/ { print $4 " soft / " $5 " hard" }' "/proc/$NODE/limits"); importing $CONNS accounts" >&2
"$BIN/clusterctl" --node "$IP:5290" import-users "$TMP/accounts.txt" >/dev/null

echo "holding $CONNS connections from $PROCS xmpp-load processes over $SOURCES" >&2
set +e
"$BIN/xmpp-load" hold --server "$IP:5222" --domain bench.test --users "$CONNS" \
    --mechanism scram-sha-1 --arrival-rate 0 --concurrency 200 --duration "$SECS" \
    --processes "$PROCS" --source-ips "$SOURCES" --server-pid "$NODE" --json >"$TMP/hold.json"
rc=$?
set -e
if [ ! -s "$TMP/hold.json" ]; then
    echo "xmpp-load printed no report (exit $rc); the node's log ends with:" >&2
    tail -5 "$TMP/node.log" >&2
    exit 1
fi
/usr/bin/python3 - "$TMP/hold.json" "$HARD" "$rc" <<'PY'
import json, math, sys
r = json.load(open(sys.argv[1]))
hard, rc = int(sys.argv[2]), int(sys.argv[3])
h = r.get("hold") or {}
held, alive = h.get("connections", 0), h.get("alive_at_end", 0)
before, after = h.get("server_rss_before_kib"), h.get("server_rss_after_kib")
kib = h.get("server_kib_per_connection")
load = r["load_process"]
print(f"connections held           {held} ({alive} alive at the end of {r['duration_s']:.0f} s), "
      f"{r['processes']} xmpp-load processes, from {len(r.get('source_addresses', {}))} source addresses")
if before is not None and after is not None:
    print(f"node RSS                   {before / 1024:.1f} MiB before the first login -> {after / 1024:.1f} MiB holding")
if kib is not None and held:
    print(f"node KiB per connection    {kib:.1f}")
    m = 1_000_000
    node_max = hard - 1000  # what one node holds at this open-files limit
    print(f"one million connections    {kib * m / 1024 / 1024:.1f} GiB of node RSS at this rate; "
          f"{math.ceil(m / node_max)} nodes of {node_max} connections ({hard} open files each), "
          f"{math.ceil(m / (hard - 64))} xmpp-load processes")
if held:
    print(f"xmpp-load RSS              {load['rss_kib_end'] / 1024:.0f} MiB for all its processes "
          f"({load['rss_kib_end'] / held:.1f} KiB per client connection)")
if not r.get("ok", False) or rc != 0:
    print(f"FAILED: {r.get('error', 'exit status %d' % rc)}")
    sys.exit(1)
PY
echo "$(date -u +%Y-%m-%d), $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
