#!/usr/bin/env bash
# scripts/demo.sh: proxy-channel end to end on loopback, in a few seconds.
#
# Starts two target platforms (scripts/demo_peers.py, python3): target 1
# answers every line with an ACK, target 2 (non-mandatory, replies off)
# only records. Starts the daemon in front of them with store mode on in a
# temporary folder, connects one GPS tracker that sends three lines and
# reads the ACKs, then shows what each target received, the recorded
# traffic (`proxy-channel view`, then `view --text`), the daemon's counters
# (`proxy-channel ctl stats`), and stops the daemon with SIGTERM.
#
# Every process it starts ends within 30 s whatever happens.
#
# Usage: scripts/demo.sh [--keep]
#   --keep   keep the temporary folder (the message file) and say where
# PROXY_CHANNEL_BIN: a proxy-channel binary to use instead of building
# target/release/proxy-channel.
set -euo pipefail
cd "$(dirname "$0")/.."

keep=
case "${1:-}" in
    --keep) keep=1 ;;
    "") ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
esac

binary=${PROXY_CHANNEL_BIN:-}
if [[ -z $binary ]]; then
    cargo build --release --quiet --bin proxy-channel
    binary=target/release/proxy-channel
fi

work=$(mktemp -d)
peers=
daemon=
cleanup() {
    [[ -n $daemon ]] && kill "$daemon" 2>/dev/null || true
    [[ -n $peers ]] && kill "$peers" 2>/dev/null || true
    wait 2>/dev/null || true
    if [[ -n $keep ]]; then
        echo "kept: $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

# Waits (at most 10 s) until the file exists and holds the pattern.
wait_for() {
    local file=$1 pattern=$2
    for _ in $(seq 100); do
        if [[ -f $file ]] && grep -q "$pattern" "$file"; then
            return 0
        fi
        sleep 0.1
    done
    echo "demo.sh: gave up waiting for '$pattern' in $file" >&2
    [[ -f $file ]] && cat "$file" >&2
    return 1
}

echo "=== two target platforms"
python3 scripts/demo_peers.py targets "$work/ports" "$work" &
peers=$!
wait_for "$work/ports" .
read -r port1 port2 < "$work/ports"
echo "target 1 on 127.0.0.1:$port1 (mandatory, replies ACK), target 2 on 127.0.0.1:$port2 (non-mandatory, replies off)"

echo
echo "=== the daemon"
env -i PATH="$PATH" \
    PROXY_LISTEN=127.0.0.1:0 \
    PROXY_TARGET1="127.0.0.1:$port1" \
    PROXY_TARGET2="127.0.0.1:$port2" \
    PROXY_TARGET2_MANDATORY=false \
    PROXY_TARGET2_REPLIES=false \
    PROXY_DATA_DIR="$work/data" \
    RUST_LOG=info \
    timeout -s KILL 30 "$binary" 2> "$work/daemon.log" &
daemon=$!
wait_for "$work/daemon.log" "listening on"
listen=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$work/daemon.log" | head -1)
sed 's/^/    /' "$work/daemon.log"

echo
echo "=== a tracker connects to $listen"
python3 scripts/demo_peers.py device "$listen"

echo
echo "=== what the targets received"
for n in 1 2; do
    echo "target $n:"
    sed 's/^/    /' "$work/target$n.txt"
done

# Messages reach the file within a second; the device's disconnect is the
# last of its connection.
wait_for "$work/data/messages.jsonl" '"proxy.event":2,"proxy.source":0'

echo
echo "=== the daemon's counters: proxy-channel ctl stats"
"$binary" ctl stats --socket "$work/data/control.sock"

echo
echo "=== the recorded traffic: proxy-channel view"
"$binary" view --no-color "$work/data"

echo
echo "=== the same as text, the device's side only: proxy-channel view --text --source 0"
"$binary" view --no-color --text --source 0 "$work/data"

echo
echo "=== SIGTERM"
kill -TERM "$daemon"
wait "$daemon"
daemon=
tail -n 2 "$work/daemon.log" | sed 's/^/    /'
