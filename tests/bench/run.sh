#!/usr/bin/env bash
# The side-by-side benchmark: our xmpp-node, Prosody and ejabberd on the same
# machine, driven the same way by xmpp-load, printed as one table.
#
#   tests/bench/run.sh [--users N] [--rates 1000,2000,...] [--long] ...
#
# What it does, in order (see --help and README "Performance"):
#   1. installs prosody and ejabberd from Debian when missing (their packaged
#      services are kept from starting, or stopped), builds ours in release;
#   2. makes one RSA-2048 self-signed certificate for the virtual host and
#      the same N accounts for all three (each server's batch way);
#   3. for each server in turn: starts it on its own loopback address with
#      the config kept next to this script, pinned to one CPU (taskset),
#      creates the accounts, and runs xmpp-load pinned to the other CPU:
#      held idle connections (memory per connection), login rate (SCRAM and
#      PLAIN), chat at stepped offered rates (the highest one delivered
#      without loss), chat at half that rate (p99 latency, CPU per message);
#      then stops it;
#   4. prints the Markdown table and writes it to tests/bench/results-DATE.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

# ---- options -------------------------------------------------------------
USERS=1000
HOLD=1000               # connections held for the memory figure, on the fresh server
BIG_HOLD=10000          # then, on the server restarted fresh, this many (0: skip)
MODERATE=5000           # the moderate rate for CPU per message and tail latency (0: skip)
LOGIN_SECS=10
LOGIN_CONCURRENCY=50
STEP_SECS=5
HALF_SECS=10
RATES="1000,2000,5000,10000,20000,40000,80000"
REFINE=2                # bisection steps between the last good and first bad rate
GRACE=3
MAX_P99_MS=100          # a step whose p99 exceeds this is falling behind
SERVERS="ours,prosody,ejabberd"
DOMAIN=bench.test
MECH=scram-sha-1
BODY=64
PLAIN_LOGIN=1           # a second login run with SASL PLAIN
SERVER_CPU=0
LOAD_CPU=1
OUT=""
KEEP=0
BUILD=1
PORT=5222
declare -A ADDR=([ours]=127.0.10.1 [prosody]=127.0.10.2 [ejabberd]=127.0.10.3)

usage() {
    cat <<EOF
usage: tests/bench/run.sh [options]

Runs our xmpp-node, Prosody and ejabberd one after the other on this
machine (server pinned to CPU $SERVER_CPU, xmpp-load to CPU $LOAD_CPU) and prints one
table. Needs root (apt-get, and running the peers as their own users).

  --users N          online users in the login and chat scenarios ($USERS)
  --hold N           idle TLS connections held for the memory figure ($HOLD)
  --big-hold N       after the other runs, the server restarted fresh holds N ($BIG_HOLD; 0 skips);
                     each server gets the largest of --users, --hold and --big-hold accounts
  --moderate-rate R  chat rate for CPU per message and p99/p99.9 ($MODERATE; 0 skips),
                     run only where the server's peak reaches it
  --rates LIST       offered chat rates to step through, msg/s ($RATES)
  --refine N         bisection steps after the first failing rate ($REFINE)
  --step-secs S      seconds of sending per chat step ($STEP_SECS)
  --half-secs S      seconds of the run at half the peak rate ($HALF_SECS)
  --login-secs S     seconds of the login run ($LOGIN_SECS)
  --login-concurrency N  logins in flight at once ($LOGIN_CONCURRENCY)
  --max-p99-ms MS    p99 above which a chat step counts as falling behind ($MAX_P99_MS)
  --body-size B      message body bytes ($BODY)
  --mechanism M      SASL mechanism: scram-sha-1 (all three store SCRAM-SHA-1), plain ($MECH)
  --no-plain-login   skip the second login run with SASL PLAIN (server-side PBKDF2)
  --servers LIST     which servers, in order ($SERVERS)
  --cpus A,B         CPU for the server, CPU for xmpp-load ($SERVER_CPU,$LOAD_CPU)
  --long             longer runs: --users 5000 --step-secs 15 --half-secs 60 --login-secs 30 --refine 3
  --out FILE         where the Markdown goes (tests/bench/results-DATE.md)
  --no-build         use the release binaries already built
  --keep             keep the temporary directory (configs, data, logs, JSON)
  -h, --help         this text
EOF
}

while [ $# -gt 0 ]; do
    case $1 in
        --users) USERS=$2; shift 2 ;;
        --hold) HOLD=$2; shift 2 ;;
        --big-hold) BIG_HOLD=$2; shift 2 ;;
        --rates) RATES=$2; shift 2 ;;
        --refine) REFINE=$2; shift 2 ;;
        --step-secs) STEP_SECS=$2; shift 2 ;;
        --half-secs) HALF_SECS=$2; shift 2 ;;
        --moderate-rate) MODERATE=$2; shift 2 ;;
        --login-secs) LOGIN_SECS=$2; shift 2 ;;
        --login-concurrency) LOGIN_CONCURRENCY=$2; shift 2 ;;
        --max-p99-ms) MAX_P99_MS=$2; shift 2 ;;
        --body-size) BODY=$2; shift 2 ;;
        --mechanism) MECH=$2; shift 2 ;;
        --no-plain-login) PLAIN_LOGIN=0; shift ;;
        --servers) SERVERS=$2; shift 2 ;;
        --cpus) SERVER_CPU=${2%,*}; LOAD_CPU=${2#*,}; shift 2 ;;
        --long) USERS=5000; STEP_SECS=15; HALF_SECS=60; LOGIN_SECS=30; REFINE=3; shift ;;
        --out) OUT=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done
ACCOUNTS=$(( HOLD > USERS ? HOLD : USERS ))
ACCOUNTS=$(( BIG_HOLD > ACCOUNTS ? BIG_HOLD : ACCOUNTS ))
TODAY=$(date +%Y-%m-%d)
OUT=${OUT:-$HERE/results-$TODAY.md}

say() { printf '%s\n' "== $*" >&2; }
die() { printf 'run.sh: error: %s\n' "$*" >&2; exit 1; }

# ---- preflight -----------------------------------------------------------
[ "$(id -u)" = 0 ] || die "run as root: it installs packages with apt-get and starts Prosody and ejabberd as their own users"
for c in taskset setpriv openssl python3 ss; do
    command -v "$c" >/dev/null || die "'$c' is missing (Debian: apt-get install util-linux openssl python3 iproute2)"
done
ncpu=$(nproc --all)
[ "$ncpu" -ge 2 ] || die "needs 2 CPUs (one for the server, one for xmpp-load); this machine has $ncpu"
for s in ${SERVERS//,/ }; do
    [ -n "${ADDR[$s]:-}" ] || die "unknown server '$s' in --servers (ours, prosody, ejabberd)"
done
PY=/usr/bin/python3; [ -x "$PY" ] || PY=python3

# ---- cleanup: only what this script started --------------------------------
TMP=""
CUR_STOP=""             # the stop function of the server running now
EPMD_PID=""             # epmd, when ejabberd's start brought it up
POLICY_RC_ADDED=0
cleanup() {
    local rc=$?
    set +e
    if [ -n "$CUR_STOP" ]; then "$CUR_STOP"; fi
    if [ -n "$EPMD_PID" ] && kill -0 "$EPMD_PID" 2>/dev/null; then kill "$EPMD_PID"; fi
    if [ "$POLICY_RC_ADDED" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    if [ -n "$TMP" ] && [ -d "$TMP" ]; then
        if [ "$KEEP" = 1 ] || [ "$rc" != 0 ]; then
            echo "run.sh: configs, data, logs and JSON kept in $TMP" >&2
        else
            rm -rf "$TMP"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits until HOST:PORT accepts a TCP connection, or dies naming the log.
wait_port() {
    local host=$1 port=$2 pid=$3 log=$4 what=$5 i
    for i in $(seq 1 150); do
        if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then return 0; fi
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$log" >&2 || true
            die "$what exited during start-up (log above: $log)"
        fi
        sleep 0.2
    done
    tail -n 30 "$log" >&2 || true
    die "$what does not listen on $host:$port after 30 s (log above: $log)"
}

# Stops a process we started: TERM, then KILL after 15 s.
stop_pid() {
    local pid=$1 i
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 75); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
}

listener_pid() { # the PID listening on ADDR:PORT, if any
    ss -Hltnp "sport = :$2" 2>/dev/null \
        | awk -v a="$1:$2" -v w="0.0.0.0:$2" -v v="*:$2" -v x="[::]:$2" '$4 == a || $4 == w || $4 == v || $4 == x' \
        | grep -o 'pid=[0-9]*' | head -n1 | cut -d= -f2
}

# ---- 1. install the peers, build ours ------------------------------------
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

install_peers() {
    local missing=() p
    for p in prosody ejabberd; do
        case ",$SERVERS," in *",$p,"*) pkg_installed "$p" || missing+=("$p") ;; esac
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing ${missing[*]} from Debian (their services are kept from starting)"
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            POLICY_RC_ADDED=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get update -qq \
            || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
            || die "apt-get install ${missing[*]} failed"
        if [ "$POLICY_RC_ADDED" = 1 ]; then rm -f /usr/sbin/policy-rc.d; POLICY_RC_ADDED=0; fi
        for p in "${missing[@]}"; do
            if [ -d /run/systemd/system ]; then
                systemctl disable --now "$p" >/dev/null 2>&1 || true
            else
                update-rc.d "$p" disable >/dev/null 2>&1 || true
            fi
        done
    fi
    # The packaged instances listen on every address (5222, 5269, 5280, ...)
    # and would take CPU from the run: they must not be running.
    local pidfile pid
    for p in prosody ejabberd; do
        case ",$SERVERS," in *",$p,"*) ;; *) continue ;; esac
        pidfile=/run/$p/$p.pid
        pid=$(cat "$pidfile" 2>/dev/null || true)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            say "stopping the packaged $p service (pid $pid): it holds the XMPP ports"
            service "$p" stop >/dev/null 2>&1 || true
            sleep 1
            if kill -0 "$pid" 2>/dev/null; then
                die "the packaged $p (pid $pid, $pidfile) is still running; stop it (service $p stop) and run again"
            fi
        fi
    done
}

build_ours() {
    local target=${CARGO_TARGET_DIR:-$ROOT/target}
    BIN=$target/release
    if [ "$BUILD" = 1 ]; then
        say "building xmpp-node, clusterctl and xmpp-load (release)"
        (cd "$ROOT" && cargo build --release -q -p node -p tests --bins) \
            || die "cargo build --release failed"
    fi
    for b in xmpp-node clusterctl xmpp-load; do
        [ -x "$BIN/$b" ] || die "$BIN/$b is missing (run without --no-build)"
    done
}

# ---- 2. certificate and accounts ----------------------------------------
make_cert() {
    openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj "/CN=$DOMAIN" \
        -addext "subjectAltName=DNS:$DOMAIN" \
        -keyout "$TMP/cert/key.pem" -out "$TMP/cert/cert.pem" 2>"$TMP/cert/openssl.log" \
        || die "openssl could not make the certificate (see $TMP/cert/openssl.log)"
}

# Fills the @...@ placeholders of a config template.
render() {
    local src=$1 dst=$2; shift 2
    local args=() kv
    for kv in "$@"; do args+=(-e "s#@${kv%%=*}@#${kv#*=}#g"); done
    sed "${args[@]}" "$src" > "$dst"
}

# Seconds since $1 (a `date +%s.%N` stamp), to one decimal.
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# ---- the three servers ---------------------------------------------------
# Each start_X sets SPID (the PID whose /proc figures are the server's) and
# CUR_STOP; each accounts_X creates the accounts and sets ACCT_SECS.

OURS_PID=""
start_ours() {
    local d=$TMP/ours
    mkdir -p "$d"
    install -m 600 "$TMP/cert/cert.pem" "$d/cert.pem"
    install -m 600 "$TMP/cert/key.pem" "$d/key.pem"
    render "$HERE/node.toml" "$d/node.toml" DIR="$d" ADDR="${ADDR[ours]}" PORT=$PORT \
        DOMAIN="$DOMAIN" CERT="$d/cert.pem" KEY="$d/key.pem"
    (cd "$d" && exec taskset -c "$SERVER_CPU" "$BIN/xmpp-node" --config "$d/node.toml" --log-format text) \
        >"$d/node.log" 2>&1 &
    OURS_PID=$!
    CUR_STOP=stop_ours
    wait_port "${ADDR[ours]}" 5290 "$OURS_PID" "$d/node.log" xmpp-node
    wait_port "${ADDR[ours]}" "$PORT" "$OURS_PID" "$d/node.log" xmpp-node
    SPID=$OURS_PID
}
stop_ours() { stop_pid "$OURS_PID"; OURS_PID=""; CUR_STOP=""; }
accounts_ours() {
    local t0; t0=$(date +%s.%N)
    "$BIN/clusterctl" --node "${ADDR[ours]}:5290" import-users "$TMP/accounts/accounts.txt" \
        >"$TMP/ours/import.log" 2>&1 || { cat "$TMP/ours/import.log" >&2; die "clusterctl import-users failed"; }
    ACCT_SECS=$(since "$t0")
    ACCT_HOW="clusterctl import-users (one file, batched through the state machine)"
}
version_ours() { "$BIN/xmpp-node" --version | awk '{print "xmpp-node " $2}'; }

PROSODY_PID=""
start_prosody() {
    local d=$TMP/prosody
    mkdir -p "$d/data" "$d/certs"
    install -m 600 "$TMP/cert/cert.pem" "$d/cert.pem"
    install -m 600 "$TMP/cert/key.pem" "$d/key.pem"
    render "$HERE/prosody.cfg.lua" "$d/prosody.cfg.lua" DIR="$d" ADDR="${ADDR[prosody]}" PORT=$PORT \
        DOMAIN="$DOMAIN" CERT="$d/cert.pem" KEY="$d/key.pem"
    chown -R prosody:prosody "$d"
    # Prosody refuses to run as root; setpriv (unlike runuser/su) keeps the
    # raised open-files limit. -F: foreground, so $! is Prosody itself.
    (cd "$d" && exec taskset -c "$SERVER_CPU" setpriv --reuid prosody --regid prosody --init-groups \
        prosody --config "$d/prosody.cfg.lua" -F) >"$d/stdout.log" 2>&1 &
    PROSODY_PID=$!
    CUR_STOP=stop_prosody
    wait_port "${ADDR[prosody]}" "$PORT" "$PROSODY_PID" "$d/prosody.log" Prosody
    SPID=$PROSODY_PID
}
stop_prosody() { stop_pid "$PROSODY_PID"; PROSODY_PID=""; CUR_STOP=""; }
accounts_prosody() {
    # Written before Prosody starts: its internal_hashed store, file by file.
    local d=$TMP/prosody t0
    mkdir -p "$d/data"
    t0=$(date +%s.%N)
    "$PY" "$HERE/accounts.py" prosody "$TMP/accounts/accounts.txt" "$DOMAIN" "$d/data" 4096 \
        || die "writing Prosody's account files failed"
    chown -R prosody:prosody "$d"
    ACCT_SECS=$(since "$t0")
    ACCT_HOW="account files written into Prosody's internal_hashed store (SCRAM-SHA-1, 4096) before it starts"
}
version_prosody() { echo "Prosody $(dpkg-query -W -f='${Version}' prosody)"; }

EJ_WRAPPER=""
EJ_BEAM=""
ejctl() { "$TMP/ejabberd/ctl.sh" "$@" 2> >(grep -v -e 'inet_config' -e '^=ERROR REPORT' -e '^$' >&2); }
start_ejabberd() {
    local d=$TMP/ejabberd before_epmd
    mkdir -p "$d/conf" "$d/spool" "$d/logs" "$d/home"
    cat "$TMP/cert/cert.pem" "$TMP/cert/key.pem" > "$d/bench.pem"
    chmod 600 "$d/bench.pem"
    render "$HERE/ejabberd.yml" "$d/conf/ejabberd.yml" DOMAIN="$DOMAIN" PEM="$d/bench.pem" \
        ADDR="${ADDR[ejabberd]}" PORT=$PORT
    cp /etc/ejabberd/inetrc "$d/conf/inetrc" 2>/dev/null || : > "$d/conf/inetrc"
    # Debian's /etc/ejabberd/ejabberdctl.cfg, with this run's pidfile.
    cat > "$d/conf/ejabberdctl.cfg" <<EOF
ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0"
EJABBERD_PID_PATH=$d/ejabberd.pid
CONTRIB_MODULES_CONF_DIR=/etc/ejabberd/modules.d
EOF
    # ejabberdctl as the ejabberd user (setpriv keeps the open-files limit;
    # ejabberdctl run as root would `su` to it), with this run's own config
    # dir, spool, logs, Erlang node name and cookie ($HOME).
    cat > "$d/ctl.sh" <<EOF
#!/bin/sh
cd "$d" && HOME="$d/home" ERL_EPMD_ADDRESS=127.0.0.1 exec setpriv --reuid ejabberd --regid ejabberd --init-groups \\
  ejabberdctl --config-dir "$d/conf" --config "$d/conf/ejabberd.yml" --ctl-config "$d/conf/ejabberdctl.cfg" \\
  --spool "$d/spool" --logs "$d/logs" --node ejabberd_bench@localhost "\$@"
EOF
    chmod 755 "$d/ctl.sh"
    chown -R ejabberd:ejabberd "$d"
    before_epmd=$(listener_pid 127.0.0.1 4369 || true)
    (exec taskset -c "$SERVER_CPU" "$d/ctl.sh" foreground) >"$d/stdout.log" 2>&1 &
    EJ_WRAPPER=$!
    CUR_STOP=stop_ejabberd
    wait_port "${ADDR[ejabberd]}" "$PORT" "$EJ_WRAPPER" "$d/logs/ejabberd.log" ejabberd
    ejctl started >/dev/null || die "ejabberd did not reach 'started' (see $d/logs/ejabberd.log)"
    EJ_BEAM=$(cat "$d/ejabberd.pid" 2>/dev/null || true)
    [ -n "$EJ_BEAM" ] && [ -r "/proc/$EJ_BEAM/stat" ] \
        || die "cannot find ejabberd's beam.smp PID (pidfile $d/ejabberd.pid)"
    if [ -z "$before_epmd" ]; then EPMD_PID=$(listener_pid 127.0.0.1 4369 || true); fi
    SPID=$EJ_BEAM
}
stop_ejabberd() {
    if [ -n "$EJ_WRAPPER" ] && kill -0 "$EJ_WRAPPER" 2>/dev/null; then
        timeout 30 "$TMP/ejabberd/ctl.sh" stop >/dev/null 2>&1 || true
        local i
        for i in $(seq 1 50); do kill -0 "$EJ_WRAPPER" 2>/dev/null || break; sleep 0.2; done
    fi
    stop_pid "$EJ_BEAM"
    stop_pid "$EJ_WRAPPER"
    EJ_WRAPPER=""; EJ_BEAM=""; CUR_STOP=""
}
accounts_ejabberd() {
    local d=$TMP/ejabberd t0 n
    local f
    t0=$(date +%s.%N)
    for f in "$TMP"/accounts/ejabberd*.xml; do
        install -o ejabberd -m 600 "$f" "$d/users.xml"
        ejctl import_piefxis "$d/users.xml" >"$d/import.log" \
            || { cat "$d/import.log" >&2; die "ejabberdctl import_piefxis of $(basename "$f") failed"; }
    done
    ACCT_SECS=$(since "$t0")
    n=$(ejctl registered_users "$DOMAIN" | grep -c . || true)
    [ "$n" -ge "$ACCOUNTS" ] || die "ejabberd has $n accounts after import_piefxis, expected $ACCOUNTS (see $d/logs/ejabberd.log)"
    ACCT_HOW="ejabberdctl import_piefxis of XEP-0227 files of 2,000 accounts (SCRAM-SHA-1, 4096, hashed by ejabberd)"
}
version_ejabberd() { echo "ejabberd $(dpkg-query -W -f='${Version}' ejabberd), Erlang/OTP $(erl -noshell -eval 'io:format("~s",[erlang:system_info(otp_release)]), halt().')"; }

# ---- 3. the scenarios ------------------------------------------------------
# xmpp-load against server $1, scenario $2, JSON into $3, more flags after.
load() {
    local s=$1 scen=$2 json=$3; shift 3
    local rc=0 mech=${LOAD_MECH:-$MECH}
    timeout 600 taskset -c "$LOAD_CPU" "$BIN/xmpp-load" "$scen" \
        --server "${ADDR[$s]}:$PORT" --domain "$DOMAIN" --tls starttls --mechanism "$mech" \
        --accounts "$TMP/accounts/accounts.txt" --server-pid "$SPID" --json --quiet "$@" \
        >"$json" 2>>"$RUN/$s.load.log" || rc=$?
    if [ ! -s "$json" ]; then
        tail -n 5 "$RUN/$s.load.log" >&2 || true
        die "xmpp-load $scen against $s produced no report (exit $rc; log $RUN/$s.load.log)"
    fi
    return 0
}

# CPU ticks (utime + stime) of the server so far.
ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$SPID/stat"; }

# Waits (up to 60 s) until the server uses under 5% of a core for a second:
# a server that fell behind is still working off its backlog.
settle() {
    local a b i
    for i in $(seq 1 60); do
        a=$(ticks); sleep 1; b=$(ticks)
        [ $((b - a)) -ge $(( $(getconf CLK_TCK) / 20 )) ] || return 0
    done
}

# After a chat run that fell behind, messages it sent are still queued in
# the server or stored offline, and would reach the same accounts in the
# next run (as stale or duplicate sequence numbers). Let the server finish,
# then log every user in once (offline messages are delivered and dropped),
# and wait again.
drain() {
    local s=$1
    settle
    load "$s" hold "$RUN/$s.drain.json" --users "$USERS" --duration 1 --arrival-rate 0 --concurrency "$LOGIN_CONCURRENCY"
    settle
}

# One chat run at offered rate $2 for $3 s, JSON into $4; sets STEP_PASS.
# $5 = quiet: no pass/fail line (the half-rate run is not a step).
chat_run() {
    local s=$1 r=$2 secs=$3 json=$4 v
    if [ "$DIRTY" = 1 ]; then drain "$s"; DIRTY=0; fi
    load "$s" chat "$json" --users "$USERS" --rate "$r" --duration "$secs" \
        --body-size "$BODY" --grace "$GRACE" --arrival-rate 0 --concurrency "$LOGIN_CONCURRENCY"
    v=$("$PY" "$HERE/report.py" verdict "$json" "$MAX_P99_MS")
    [ "${5:-}" = quiet ] || echo "   $v" >&2
    if [ "${v%%:*}" = pass ]; then STEP_PASS=1; else STEP_PASS=0; DIRTY=1; fi
}

measure() {
    local s=$1 r good="" bad="" rates i
    local common=(--arrival-rate 0 --concurrency "$LOGIN_CONCURRENCY")
    DIRTY=0

    # Memory first, on a server that has not yet served anything: later
    # runs leave freed memory in the allocator that new connections reuse.
    say "$s: hold $HOLD idle connections"
    load "$s" hold "$RUN/$s.hold.json" --users "$HOLD" --duration 5 "${common[@]}"
    "$PY" "$HERE/report.py" brief "$RUN/$s.hold.json" >&2
    # Closing the held sessions keeps a server busy for a moment.
    settle

    say "$s: login ($MECH) for ${LOGIN_SECS}s ($LOGIN_CONCURRENCY in flight)"
    load "$s" login "$RUN/$s.login.json" --users "$USERS" --duration "$LOGIN_SECS" "${common[@]}"
    "$PY" "$HERE/report.py" brief "$RUN/$s.login.json" >&2
    if [ "$PLAIN_LOGIN" = 1 ] && [ "$MECH" != plain ]; then
        # PLAIN makes every server run PBKDF2 (4096 rounds) per login.
        say "$s: login (plain) for ${LOGIN_SECS}s ($LOGIN_CONCURRENCY in flight)"
        LOAD_MECH=plain load "$s" login "$RUN/$s.login-plain.json" --users "$USERS" \
            --duration "$LOGIN_SECS" "${common[@]}"
        "$PY" "$HERE/report.py" brief "$RUN/$s.login-plain.json" >&2
    fi

    IFS=, read -r -a rates <<<"$RATES"
    for r in "${rates[@]}"; do
        say "$s: chat at $r msg/s for ${STEP_SECS}s"
        chat_run "$s" "$r" "$STEP_SECS" "$RUN/$s.chat-$r.json"
        if [ "$STEP_PASS" = 1 ]; then good=$r; else bad=$r; break; fi
    done
    if [ -n "$good" ] && [ -n "$bad" ]; then
        for ((i = 0; i < REFINE; i++)); do
            r=$(( (good + bad) / 2 ))
            # Not worth a run when the bracket is within 10%.
            [ $((bad - good)) -gt $((good / 10)) ] || break
            say "$s: chat at $r msg/s for ${STEP_SECS}s (between $good and $bad)"
            chat_run "$s" "$r" "$STEP_SECS" "$RUN/$s.chat-$r.json"
            if [ "$STEP_PASS" = 1 ]; then good=$r; else bad=$r; fi
        done
    fi
    echo "${good:-0}" > "$RUN/$s.peak"

    # Half the peak: latency and CPU per message at a rate the server holds.
    r=$(( ${good:-${rates[0]}} / 2 ))
    say "$s: chat at $r msg/s (half the peak) for ${HALF_SECS}s"
    chat_run "$s" "$r" "$HALF_SECS" "$RUN/$s.half.json" quiet
    "$PY" "$HERE/report.py" brief "$RUN/$s.half.json" >&2

    # The rate most servers actually run at: CPU per message and the tail,
    # for the servers whose peak reaches it.
    if [ "$MODERATE" -gt 0 ] && [ "${good:-0}" -ge "$MODERATE" ]; then
        say "$s: chat at $MODERATE msg/s (moderate) for ${HALF_SECS}s"
        chat_run "$s" "$MODERATE" "$HALF_SECS" "$RUN/$s.moderate.json" quiet
        "$PY" "$HERE/report.py" brief "$RUN/$s.moderate.json" >&2
    fi
}

# ---- main ------------------------------------------------------------------
install_peers
build_ours

TMP=$(mktemp -d /tmp/xmpp-bench.XXXXXX)
chmod 755 "$TMP"
RUN=$TMP/results
mkdir -p "$TMP/cert" "$TMP/accounts" "$RUN"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" -gt $((HOLD + BIG_HOLD + USERS + 256)) ] \
    || die "the open-files limit ($(ulimit -n)) is too low for $HOLD connections; raise the hard limit"

make_cert
"$PY" "$HERE/accounts.py" lists "$ACCOUNTS" "$DOMAIN" "$TMP/accounts"

for s in ${SERVERS//,/ }; do
    busy=$(listener_pid "${ADDR[$s]}" "$PORT" || true)
    [ -z "$busy" ] || die "${ADDR[$s]}:$PORT is taken by pid $busy; the benchmark needs it for $s"
done

{
    echo "date=$TODAY"
    echo "host=$(uname -srm), $(nproc --all) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
    echo "cpu=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
    echo "users=$USERS"; echo "accounts=$ACCOUNTS"; echo "hold=$HOLD"; echo "big_hold=$BIG_HOLD"; echo "moderate=$MODERATE"; echo "mechanism=$MECH"; echo "body=$BODY"
    echo "login_secs=$LOGIN_SECS"; echo "login_concurrency=$LOGIN_CONCURRENCY"
    echo "step_secs=$STEP_SECS"; echo "half_secs=$HALF_SECS"; echo "rates=$RATES"
    echo "max_p99_ms=$MAX_P99_MS"; echo "grace=$GRACE"
    echo "server_cpu=$SERVER_CPU"; echo "load_cpu=$LOAD_CPU"
    echo "servers=$SERVERS"
} > "$RUN/run.meta"

for s in ${SERVERS//,/ }; do
    say "$s on ${ADDR[$s]}:$PORT (CPU $SERVER_CPU; xmpp-load on CPU $LOAD_CPU)"
    # Prosody reads its accounts from files, so they are written before it
    # starts; the others import them into the running server.
    if [ "$s" = prosody ]; then accounts_prosody; fi
    "start_$s"
    if [ "$s" != prosody ]; then
        "accounts_$s"
        # Measured from a fresh process: the import's freed memory would
        # otherwise be reused by the held connections and hide their cost.
        "$CUR_STOP"
        "start_$s"
    fi
    say "$s: $ACCOUNTS accounts in ${ACCT_SECS}s"
    {
        echo "version=$("version_$s")"
        echo "accounts_secs=$ACCT_SECS"
        echo "accounts_how=$ACCT_HOW"
        echo "address=${ADDR[$s]}:$PORT"
    } > "$RUN/$s.meta"
    measure "$s"
    "$CUR_STOP"
    if [ "$BIG_HOLD" -gt 0 ]; then
        # Memory at scale, on a fresh process (the accounts persist).
        say "$s: restarted; hold $BIG_HOLD idle connections"
        "start_$s"
        load "$s" hold "$RUN/$s.bighold.json" --users "$BIG_HOLD" --duration 5 \
            --arrival-rate 0 --concurrency "$LOGIN_CONCURRENCY"
        "$PY" "$HERE/report.py" brief "$RUN/$s.bighold.json" >&2
        "$CUR_STOP"
    fi
done

"$PY" "$HERE/report.py" table "$RUN" > "$OUT"
cat "$OUT"
echo >&2
say "written to $OUT"
