# Shared by the one-node benchmark scripts (http.sh, archive.sh, muc.sh):
# a release build, a temporary directory cleaned up on exit, and one
# xmpp-node on the script's own loopback address with the limits a load
# generator needs raised. Source it after setting IP; then
# `node_config DATA_DIR [EXTRA_TOML] > FILE`, `start_node FILE LOG`
# (sets NODE; pinned with NODE_PIN=(taskset -c N)), `stop_node`.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
cargo build --release -q -p node -p tests --bins
BIN=$ROOT/target/release
TMP=$(mktemp -d)
NODE=
cleanup() { [ -n "$NODE" ] && kill "$NODE" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

node_config() { # data dir, extra TOML (tables) appended
    cat <<TOML
node_id = 1
data_dir = "$1"
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
# The simulated users send far faster than people, all from one address.
stanzas_per_second = 1000000
stanza_burst = 1000000
max_unauthenticated = 100000
max_unauthenticated_per_address = 100000
[log]
level = "warn"
${2:-}
TOML
}

start_node() { # config file, log file; with NODE_PIN=(taskset -c N) set, pinned
    ${NODE_PIN[@]+"${NODE_PIN[@]}"} "$BIN/xmpp-node" --config "$1" 2>>"$2" &
    NODE=$!
    for _ in $(seq 150); do
        "$BIN/clusterctl" --node "$IP:5290" status >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "the node did not come up: $(tail -5 "$2")" >&2
    exit 1
}

stop_node() { kill "$NODE"; wait "$NODE" 2>/dev/null || true; NODE=; }
