#!/usr/bin/env bash
# Fuzzes the protocol parsers with cargo-fuzz (libFuzzer): the stream
# parser and framer with the stanza views (`stream`), JID parsing (`jid`),
# and the SASL server with PLAIN, SCRAM and the GS2 header (`sasl`).
#
#   xmpp/fuzz/run.sh [SECONDS]     # per target; default 20 (CI's short run)
#   xmpp/fuzz/run.sh 600           # a longer run; 10 million runs take about
#                                  # 6 minutes per target on this machine
#
# Works on the stable toolchain (RUSTC_BOOTSTRAP=1 unlocks the sanitizer
# flags cargo-fuzz passes); installs cargo-fuzz from crates.io if missing.
# Seeds are in xmpp/fuzz/corpus/<target>; a crash is saved under
# xmpp/fuzz/artifacts/<target>/ and fails the run.
set -euo pipefail
SECS=${1:-20}
cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --version 0.13.2
fi
cargo fuzz build -O
for t in stream jid sasl; do
    # The corpus grows in a copy: the seeds in the repository stay small.
    work=$(mktemp -d)
    cp -r "fuzz/corpus/$t/." "$work/"
    echo "fuzzing $t for ${SECS}s"
    cargo fuzz run -O "$t" "$work" -- -max_total_time="$SECS" -rss_limit_mb=2048 \
        -timeout=10 -max_len=65536 -print_final_stats=1 2>&1 | grep -E "^(stat::number_of_executed_units|Done|==|SUMMARY)|panicked" || true
    status=${PIPESTATUS[0]}
    rm -rf "$work"
    if [ "$status" -ne 0 ]; then
        echo "fuzz target $t failed (see xmpp/fuzz/artifacts/$t/)" >&2
        exit 1
    fi
done
