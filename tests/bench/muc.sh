#!/usr/bin/env bash
# Group chat fan-out (XEP-0045): one room of --occupants, one sender at
# --rate messages/s; copies delivered per second and server CPU per
# delivered copy (each message is one replicated write, then a copy per
# occupant). One node on 127.0.35.1, nothing pinned; prints the figures.
#
#   tests/bench/muc.sh [--occupants N] [--messages M] [--rate R]
set -euo pipefail
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
IP=127.0.35.1
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
mkdir -p "$TMP/data"
node_config "$TMP/data" "[muc]
max_occupants = 100000
messages_per_second = 1000000
message_burst = 1000000" >"$TMP/node.toml"
start_node "$TMP/node.toml" "$TMP/node.log"
"$BIN/xmpp-load" accounts --users "$OCC" --domain bench.test >"$TMP/accounts.txt"
"$BIN/clusterctl" --node "$IP:5290" import-users "$TMP/accounts.txt" >/dev/null
echo "($(date -u +%F), $OCC occupants, $MSGS messages at $RATE/s)"
"$BIN/muc-bench" --server "$IP:5222" --domain bench.test --occupants "$OCC" \
    --messages "$MSGS" --rate "$RATE" --server-pid "$NODE"
