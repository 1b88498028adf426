#!/usr/bin/env bash
# Our node measured by an outside generator: Debian's tsung runs
# tests/bench/tsung/chat.xml (users over STARTTLS, SASL PLAIN, bind, roster
# get, initial presence, then chat messages to random online users at a
# total rate, one message per TLS record) and this script prints the
# server's CPU per delivered message and tsung's own figures.
#
#   tests/bench/tsung.sh [--users N] [--rate MSG_PER_S] [--secs S] [--size BYTES] [--no-pin]
#   tests/bench/tsung.sh --hold N [--no-pin]
#
# Defaults: 1,000 users, 5,000 msg/s in total, 20 s of chat, 64-byte bodies.
#
# With --hold N it measures memory instead (tests/bench/tsung/hold.xml): the
# node, restarted after the accounts are in (so the import's freed heap
# does not flatter it), holds N users online and idle after STARTTLS,
# PLAIN, bind, roster get and initial presence; the figure is (RSS holding
# - RSS before) / N, read 3 s after the last initial presence arrived.
# The node runs on 127.0.34.1 with data in a temporary directory and the
# archive off (as in run.sh), pinned to CPU 0 and tsung to CPU 1 (taskset;
# --no-pin to share both). Accounts are user1..userN / pw1..pwN, made by
# `xmpp-load accounts` and imported with `clusterctl import-users`: the
# names tsung's jabber plugin generates from username="user" passwd="pw".
#
# CPU per message is read over a steady window inside the chat phase (from
# 1 s after the first message, for 60% of --secs): the node's CPU time from
# /proc/PID/stat (as xmpp-load reads it) over the messages the node wrote to
# clients in that window (xmpp_stanzas_out_total{kind="message"} on its
# /metrics), so logins and teardown are not in it.
set -euo pipefail
USERS=1000
RATE=5000
SECS=20
SIZE=64
PIN=1
HOLD=0
while [ $# -gt 0 ]; do
    case $1 in
        --users) USERS=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --secs) SECS=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --no-pin) PIN=0; shift ;;
        --hold) HOLD=$2; shift 2 ;;
        -h|--help) sed -n 2,28p "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
command -v tsung >/dev/null || { echo "tsung is missing: apt-get install -y tsung" >&2; exit 2; }
IP=127.0.34.1
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
TSUNG=
EPMD_BEFORE=$(pgrep -x epmd >/dev/null && echo yes || echo no)
cleanup_tsung() {
    # tsung runs in its own process group (setsid below): stop all of it,
    # and the Erlang port mapper its BEAM started if none ran before.
    [ -n "$TSUNG" ] && kill -- "-$TSUNG" 2>/dev/null
    [ "$EPMD_BEFORE" = no ] && epmd -kill >/dev/null 2>&1
    cleanup
}
trap cleanup_tsung EXIT

NODE_PIN=() LOAD_CPU=()
if [ "$PIN" = 1 ] && [ "$(nproc)" -ge 2 ]; then
    NODE_PIN=(taskset -c 0) LOAD_CPU=(taskset -c 1)
fi

mkdir -p "$TMP/data" "$TMP/log"
node_config "$TMP/data" "[mam]
enabled = false" >"$TMP/node.toml"
start_node "$TMP/node.toml" "$TMP/node.log"
[ "$HOLD" -gt 0 ] && USERS=$HOLD
"$BIN/xmpp-load" accounts --users "$USERS" --domain bench.test >"$TMP/accounts.txt"
"$BIN/clusterctl" --node "$IP:5290" import-users "$TMP/accounts.txt" >/dev/null

# The scenario with this run's numbers: each user sends SECS*RATE/USERS
# messages with a mean gap of USERS/RATE seconds.
MSGS=$(( (RATE * SECS + USERS - 1) / USERS ))
THINK=$(awk -v u="$USERS" -v r="$RATE" 'BEGIN { printf "%.4f", u / r }')
ARRIVAL_RATE=200
# Twice the time the rate needs: tsung starts users as a Poisson stream and
# ends the phase on time, and every user must arrive (maxnumber caps them).
ARRIVAL_S=$(( 2 * USERS / ARRIVAL_RATE + 5 ))
TAIL=5
sed -e "s/@USERS@/$USERS/g" -e "s/@MSGS@/$MSGS/g" -e "s/@THINK@/$THINK/g" \
    -e "s/@SIZE@/$SIZE/g" -e "s/@RATE@/$RATE/g" -e "s/@TAIL@/$TAIL/g" \
    -e "s/@HOST@/$IP/g" -e "s/@PORT@/5222/g" -e "s/@DOMAIN@/bench.test/g" \
    -e "s/@ARRIVAL_RATE@/$ARRIVAL_RATE/g" -e "s/@ARRIVAL_S@/$ARRIVAL_S/g" \
    "$ROOT/tests/bench/tsung/chat.xml" >"$TMP/chat.xml"

# metric NAME KIND: a counter of the node's /metrics (0 before its first use).
metric() {
    curl -s "http://$IP:5280/metrics" |
        awk -v m="$1" -v k="$2" '$1 == m "{kind=\"" k "\"}" || $1 == m "_total{kind=\"" k "\"}" { v = $2 } END { print v + 0 }'
}
routed() {
    curl -s "http://$IP:5280/metrics" |
        awk -v o="$1" '$1 == "xmpp_routed_total{outcome=\"" o "\"}" { v = $2 } END { print v + 0 }'
}
# CPU seconds of the node so far (utime + stime, /proc/PID/stat fields 14-15).
cpu_s() {
    awk -v t="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); print ($12 + $13) / t }' "/proc/$NODE/stat"
}

# Waits for tsung to end, at most $1 s: a user that never came online would
# keep the others waiting for it (wait_global) for ever.
wait_tsung() {
    local deadline=$((SECONDS + $1))
    while kill -0 "$TSUNG" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
        sleep 0.5
    done
    if kill -0 "$TSUNG" 2>/dev/null; then
        echo "tsung did not finish within $1 s; users started: $(grep -h '^stats: users_count' "$TMP"/log/*/tsung.log 2>/dev/null | tail -1 | awk '{ print $4 }') of $USERS" >&2
        exit 1
    fi
    wait "$TSUNG" || { echo "tsung failed:" >&2; tail -20 "$TMP/tsung.out" >&2; exit 1; }
    TSUNG=
}

if [ "$HOLD" -gt 0 ]; then
    # tsung needs a descriptor per connection.
    ulimit -n "$(ulimit -Hn)"
    stop_node
    start_node "$TMP/node.toml" "$TMP/node.log"
    sleep 1
    rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$NODE/status"; }
    before=$(rss_kib)
    ARRIVAL_RATE=400
    # Twice the time the rate needs: tsung starts users as a Poisson stream and
    # ends the phase on time, and every user must arrive (maxnumber caps them).
    ARRIVAL_S=$(( 2 * USERS / ARRIVAL_RATE + 5 ))
    sed -e "s/@USERS@/$USERS/g" -e "s/@HOLD_S@/10/g" \
        -e "s/@HOST@/$IP/g" -e "s/@PORT@/5222/g" -e "s/@DOMAIN@/bench.test/g" \
        -e "s/@ARRIVAL_RATE@/$ARRIVAL_RATE/g" -e "s/@ARRIVAL_S@/$ARRIVAL_S/g" \
        "$ROOT/tests/bench/tsung/hold.xml" >"$TMP/hold.xml"
    p0=$(metric xmpp_stanzas_in_total presence)
    setsid "${LOAD_CPU[@]}" tsung -f "$TMP/hold.xml" -l "$TMP/log" start >"$TMP/tsung.out" 2>&1 &
    TSUNG=$!
    deadline=$((SECONDS + ARRIVAL_S + 60))
    while kill -0 "$TSUNG" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ] &&
        [ $(( $(metric xmpp_stanzas_in_total presence) - p0 )) -lt "$USERS" ]; do
        sleep 0.5
    done
    sleep 3
    online=$(( $(metric xmpp_stanzas_in_total presence) - p0 ))
    held=$(curl -s "http://$IP:5280/metrics" |
        awk '$1 == "xmpp_connections{transport=\"tls\"}" { v = $2 } END { print v + 0 }')
    holding=$(rss_kib)
    # The figure is read; tsung's closing of the users is not waited for
    # (the exit trap stops it).
    echo "tsung against xmpp-node: $USERS users held idle over STARTTLS + PLAIN (bind, roster get, initial presence)"
    awk -v n="$USERS" -v online="$online" -v held="$held" -v b="$before" -v h="$holding" 'BEGIN {
        printf "initial presences / TLS connections  %d / %d of %d\n", online, held, n
        printf "node RSS before -> holding           %.1f -> %.1f MiB\n", b / 1024, h / 1024
        if (held > 0) printf "node KiB per held connection        %.2f\n", (h - b) / held
    }'
    [ "$online" -ge "$USERS" ] && [ "$held" -ge "$USERS" ] || { echo "not every user came online" >&2; exit 1; }
    exit 0
fi

in0=$(metric xmpp_stanzas_in_total message)
out0=$(metric xmpp_stanzas_out_total message)
setsid "${LOAD_CPU[@]}" tsung -f "$TMP/chat.xml" -l "$TMP/log" start >"$TMP/tsung.out" 2>&1 &
TSUNG=$!

# The steady window: from 1 s after the first message, for 60% of --secs.
WINDOW=$(awk -v s="$SECS" 'BEGIN { w = s * 0.6; if (w < 1) w = 1; print w }')
deadline=$((SECONDS + ARRIVAL_S + 60))
while kill -0 "$TSUNG" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ] &&
    [ "$(metric xmpp_stanzas_in_total message)" = "$in0" ]; do
    sleep 0.1
done
sleep 1
c1=$(cpu_s) d1=$(metric xmpp_stanzas_out_total message) t1=$(date +%s.%N)
sleep "$WINDOW"
c2=$(cpu_s) d2=$(metric xmpp_stanzas_out_total message) t2=$(date +%s.%N)
running=$(kill -0 "$TSUNG" 2>/dev/null && echo yes || echo no)

wait_tsung $((ARRIVAL_S + SECS * 2 + TAIL + 60))
in_total=$(( $(metric xmpp_stanzas_in_total message) - in0 ))
out_total=$(( $(metric xmpp_stanzas_out_total message) - out0 ))
offline=$(routed offline)
errors=$(routed error)

echo "tsung against xmpp-node: $USERS users, $RATE msg/s offered for ${SECS}s ($MSGS per user, mean gap ${THINK}s), ${SIZE}-byte bodies, STARTTLS + PLAIN"
awk -v c1="$c1" -v c2="$c2" -v d1="$d1" -v d2="$d2" -v t1="$t1" -v t2="$t2" -v in_total="$in_total" -v out_total="$out_total" -v offline="$offline" -v errors="$errors" -v running="$running" 'BEGIN {
    d = d2 - d1; w = t2 - t1
    printf "steady window                     %.1f s%s\n", w, (running == "yes" ? "" : " (tsung had finished: the window is not steady, raise --secs)")
    printf "messages delivered in the window  %d (%.0f/s)\n", d, d / w
    printf "server CPU in the window          %.2f s (%.2f cores)\n", c2 - c1, (c2 - c1) / w
    if (d > 0) printf "server CPU-ms per delivered msg   %.4f\n", (c2 - c1) * 1000 / d
    printf "messages received / delivered     %d / %d over the whole run\n", in_total, out_total
    printf "stored offline / errors           %d / %d\n", offline, errors
}'

# tsung's own figures: the last statistics dump of its log holds the run's
# totals. A sample line is `stats: NAME n mean stddev max min mean_total
# n_total` (ms; n and mean for the last period only), a counter line
# `stats: NAME n total`.
LOG=$(find "$TMP/log" -name tsung.log | head -1)
if [ -n "$LOG" ]; then
    echo "tsung's figures (its tsung.log, totals):"
    awk '/^stats: / { last[$2] = $0 }
    function sample(k, label,   f) {
        if (!(k in last)) return
        split(last[k], f, " ")
        printf "  %-32s %d, mean %.2f ms, max %.2f ms\n", label, f[9], f[8], f[6]
    }
    function counter(k, label,   f) {
        if (!(k in last)) return
        split(last[k], f, " ")
        printf "  %-32s %s\n", label, f[4]
    }
    END {
        counter("users_count", "users started")
        counter("finish_users_count", "users finished")
        sample("connect", "TCP connects")
        sample("tr_login", "logins (PLAIN, bind)")
        sample("tr_roster", "roster gets")
        sample("xmpp_msg_latency", "stamped messages received")
        counter("size_sent", "bytes sent")
        counter("size_rcv", "bytes received")
        for (k in last) if (k ~ /^error/) counter(k, k)
    }' "$LOG"
    echo "  (tsung counts one stamped message per read, so a read holding two counts once)"
fi
