#!/usr/bin/env bash
# scripts/bench.sh: proxy-channel against haproxy (mode tcp), same load, same
# machine, loopback only.
#
# Builds the release binaries (proxy-channel and the load generator,
# loadgen/src), installs haproxy if it is missing, then runs every case
# of `loadgen cases` round after round: within a round each case runs
# against proxy-channel, then haproxy (A B A B ...), and against no proxy at
# all ("direct", the physical reference) in odd rounds. Each run is one
# `loadgen run` process that starts the proxy itself, checks every byte the
# devices sent, and prints one JSON line (to --out). A run that lost or
# corrupted anything is a failure, not a figure. At the end
# `loadgen report` prints one table of medians and the pc/haproxy ratios.
#
# Usage: scripts/bench.sh [--quick] [--rounds N] [--only CASE,...] [--out FILE]
#        scripts/bench.sh --report FILE     (the table of an earlier run)
#   --quick    3 rounds, short windows, 3,000 trackers for 5 s: for development
#   --rounds   rounds (default 5)
#   --only     a subset of cases, e.g. --only echo-50c,trackers
#              (the list: target/release/loadgen cases)
#   --out      results file (default target/bench/results.jsonl)
# The catch-up cases (catchup-live-*) stream 1 GiB into message files in
# /dev/shm (about 2.3 GB there while they run). The full run takes about 12
# minutes on 2 cores. Exit status 1 if any run failed.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=5
rounds_set=
quick=()
only=()
out=target/bench/results.jsonl
report_only=
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) quick=(--quick) ;;
        --rounds) rounds="$2"; rounds_set=1; shift ;;
        --only) only=(--only "$2"); shift ;;
        --out) out="$2"; shift ;;
        --report) report_only="$2"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ ${#quick[@]} -gt 0 && -z $rounds_set ]]; then
    rounds=3
fi

child=
# Runs a command in a process group of its own, in the background so that
# the traps can stop it (bash runs a trap only once a foreground command has
# ended); returns its status.
run() {
    setsid "$@" &
    child=$!
    local status=0
    wait "$child" || status=$?
    child=
    return "$status"
}
cleanup() {
    # The command in progress and its group: cargo's rustc jobs, or loadgen
    # and its proxy (which would also die with loadgen: PR_SET_PDEATHSIG).
    if [[ -n $child ]] && kill -0 "$child" 2>/dev/null; then
        kill -TERM -- "-$child" 2>/dev/null || true
        wait "$child" 2>/dev/null || true
        # A store case's message files in memory (loadgen's memory_dir).
        rm -rf "/dev/shm/loadgen-$child"
    fi
    if [[ -n ${work:-} ]]; then
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

run cargo build --release --quiet --workspace
loadgen=target/release/loadgen
if [[ -n $report_only ]]; then
    exec "$loadgen" report "$report_only"
fi

sudo=()
if [[ $(id -u) -ne 0 ]]; then
    sudo=(sudo)
fi
updated=
# haproxy is the peer; strace slows the writer in the fairness cases.
missing=()
for tool in haproxy strace; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "bench.sh: installing ${missing[*]} (apt-get)" >&2
    run "${sudo[@]}" apt-get update -qq
    updated=1
    run "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The UDP cases' peer: nginx's stream module (haproxy has no UDP). Debian
# ships the module apart.
if ! command -v nginx >/dev/null ||
    { [[ -d /usr/lib/nginx/modules ]] && [[ ! -e /usr/lib/nginx/modules/ngx_stream_module.so ]]; }; then
    echo "bench.sh: installing nginx and its stream module (apt-get)" >&2
    if [[ -z $updated ]]; then
        run "${sudo[@]}" apt-get update -qq
    fi
    run "${sudo[@]}" apt-get install -y -qq nginx-light libnginx-mod-stream >/dev/null
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/proxy-bench.XXXXXX")

mkdir -p "$(dirname "$out")"
: >"$out"
mapfile -t cases < <("$loadgen" cases "${only[@]}")
if [[ ${#cases[@]} -eq 0 ]]; then
    echo "bench.sh: no such case; see $loadgen cases" >&2
    exit 2
fi

failed=0
started=$SECONDS
for ((round = 1; round <= rounds; round++)); do
    echo "--- round $round of $rounds ($((SECONDS - started)) s so far)" >&2
    for line in "${cases[@]}"; do
        read -r case proxies <<<"$line"
        for proxy in $proxies; do
            if [[ $proxy == direct && $((round % 2)) -eq 0 ]]; then
                continue # the reference runs in odd rounds only, to save time
            fi
            run "$loadgen" run "$case" "$proxy" --round "$round" "${quick[@]}" \
                --work-dir "$work/run" \
                --haproxy-template scripts/haproxy-bench.cfg.template >>"$out" || failed=1
        done
    done
done

echo >&2
echo "proxy-channel $(git rev-parse --short HEAD 2>/dev/null || echo '?') vs $(haproxy -v | head -1 | cut -d' ' -f1-3);" \
    "$(nproc) CPUs, $(uname -r); $rounds rounds in $((SECONDS - started)) s; results in $out"
echo "threads: PROXY_WORKERS=2, haproxy nbthread 2, nginx one process (UDP rows); loadgen unpinned"
echo
"$loadgen" report "$out" || failed=1
exit "$failed"
