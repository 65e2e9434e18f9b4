#!/usr/bin/env bash
# One command for a fresh GPU machine (CUDA, Python torch 2.x, CMake, a C++ compiler; no Node, no
# network): build the addon against the machine's PyTorch, run the GPU tests and the GPU benchmark,
# and write gpu-check.json + gpu-check.md (plus every log) into $OUT, or ./gpu-check/.
#
#   scripts/gpu-check.sh                 everything, in about 8 minutes (GPU_CHECK_BUDGET=480 s)
#   NODE=/path/to/node scripts/gpu-check.sh
#
# What it needs next to the checkout, prepared on a machine that has them (scripts/pack-gpu-check.sh
# does all three into .gpu-carry/, about 57 MB; copy or carry that folder along with the checkout):
#   Node >= 20:    $NODE; or .node/bin/node; or an official tarball .node/node-v20.*-linux-x64.tar.xz
#                  (unpacked here); or .gpu-carry/node.xz (an xz-compressed node binary); or node on PATH.
#   node_modules:  run `npm ci` on a machine with network, then copy the checkout with its node_modules;
#                  or .gpu-carry/node_modules.tar.xz (unpacked here when node_modules is missing).
#   the fixtures:  $SINGLEINSERT_FIXTURES; or ../shared/fixtures; or shared/fixtures; or
#                  .gpu-carry/fixtures.tar.xz (the subset test/gpu.test.ts reads).
# libtorch: LIBTORCH if set, else Python torch's (scripts/find-libtorch.mjs), so a CUDA build.
#
# Stages (each with its own timeout, skipped when the budget is spent): env, typescript, build (a
# failed CUDA-extras compile is retried without them; a "C++20 required" failure with C++20), gpu
# tests (SINGLEINSERT_CUDA=1 jest test/gpu.test.ts), bench (scripts/bench-gpu.mjs), the optional
# PyTorch baseline (scripts/bench-pytorch.py; "diffusers not installed" is recorded, not an error),
# summary. Exit status 0 when the build and the GPU tests passed.
#
# GPU_CHECK_DRY_RUN=1 runs the same stages on the CPU (the GPU tests in their dry-run mode, the
# benchmark in --quick mode): a check of this script on a machine without a GPU.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
DEST=${OUT:-$ROOT/gpu-check}
mkdir -p "$DEST"
BUDGET=${GPU_CHECK_BUDGET:-480}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
if [ "$DRY_RUN" = 1 ]; then BENCH_ARGS=(--device cpu --quick); PT_ARGS="--device cpu --quick"; else BENCH_ARGS=(--device cuda); PT_ARGS="--device cuda"; fi
START=$(date +%s)
STAGES="$DEST/stages.tsv"
: > "$STAGES"

say() { echo "[gpu-check $(($(date +%s) - START))s] $*" | tee -a "$DEST/gpu-check.log" >&2; }
remaining() { echo $((BUDGET - ($(date +%s) - START))); }

# run_stage NAME MAX_SECONDS MIN_SECONDS command...: runs with timeout min(MAX, remaining budget), logs
# to $DEST/NAME.log, records "NAME status seconds rc" in stages.tsv; skipped when less than MIN remains.
run_stage() {
  local name=$1 max=$2 min=$3
  shift 3
  local left
  left=$(remaining)
  if [ "$left" -lt "$min" ]; then
    say "$name: skipped (budget: ${left}s left, needs ${min}s)"
    printf '%s\tskipped\t0\t-\n' "$name" >> "$STAGES"
    return 99
  fi
  local limit=$((left < max ? left : max))
  say "$name: running (timeout ${limit}s)"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" > "$DEST/$name.log" 2>&1
  rc=$?
  local secs=$(($(date +%s) - t0)) status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout; elif [ "$rc" -ne 0 ]; then status=failed; fi
  say "$name: $status after ${secs}s (rc $rc)"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "$rc" >> "$STAGES"
  return $rc
}

# ---------------------------------------------------------------- 1. Node, node_modules, fixtures

CARRY="$ROOT/.gpu-carry"
NODE_BIN=${NODE:-}
if [ -z "$NODE_BIN" ] && [ -x "$ROOT/.node/bin/node" ]; then NODE_BIN="$ROOT/.node/bin/node"; fi
if [ -z "$NODE_BIN" ]; then
  for t in "$ROOT"/.node/node-v*-linux-*.tar.xz "$ROOT"/.node/node-v*-linux-*.tar.gz; do
    [ -f "$t" ] || continue
    mkdir -p "$ROOT/.node/unpacked" && tar -xf "$t" -C "$ROOT/.node/unpacked" --strip-components=1 && NODE_BIN="$ROOT/.node/unpacked/bin/node"
    break
  done
fi
if [ -z "$NODE_BIN" ] && [ -f "$CARRY/node.xz" ]; then
  mkdir -p "$CARRY/bin" && xz -dc "$CARRY/node.xz" > "$CARRY/bin/node" && chmod +x "$CARRY/bin/node" && NODE_BIN="$CARRY/bin/node"
fi
if [ -z "$NODE_BIN" ]; then NODE_BIN=$(command -v node || true); fi
if [ -z "$NODE_BIN" ] || ! "$NODE_BIN" --version > /dev/null 2>&1; then
  say "no usable Node: set NODE=/path/to/node, or put an official node-v20.x-linux-x64.tar.xz into .node/, or run scripts/pack-gpu-check.sh where Node is installed"
  printf 'node\tfailed\t0\t1\n' >> "$STAGES"
  exit 1
fi
NODE_BIN=$(cd "$(dirname "$NODE_BIN")" && pwd)/$(basename "$NODE_BIN")
export NODE_BIN
export PATH="$(dirname "$NODE_BIN"):$PATH"  # CMakeLists.txt runs `node` to find node-addon-api
say "node $("$NODE_BIN" --version) at $NODE_BIN"

if [ ! -d "$ROOT/node_modules" ] && [ -f "$CARRY/node_modules.tar.xz" ]; then
  say "unpacking .gpu-carry/node_modules.tar.xz"
  tar -xJf "$CARRY/node_modules.tar.xz" -C "$ROOT"
fi
for pkg in typescript jest ts-jest cmake-js node-addon-api node-api-headers; do
  if [ ! -d "$ROOT/node_modules/$pkg" ]; then
    say "node_modules/$pkg is missing: run \`npm ci\` on a machine with network and copy node_modules along (or scripts/pack-gpu-check.sh)"
    printf 'node_modules\tfailed\t0\t1\n' >> "$STAGES"
    exit 1
  fi
done

if [ -z "${SINGLEINSERT_FIXTURES:-}" ]; then
  for d in "$ROOT/../shared/fixtures" "$ROOT/shared/fixtures" "$CARRY/fixtures"; do
    if [ -f "$d/README.md" ]; then export SINGLEINSERT_FIXTURES=$(cd "$d" && pwd); break; fi
  done
  if [ -z "${SINGLEINSERT_FIXTURES:-}" ] && [ -f "$CARRY/fixtures.tar.xz" ]; then
    mkdir -p "$CARRY/fixtures" && tar -xJf "$CARRY/fixtures.tar.xz" -C "$CARRY/fixtures" && export SINGLEINSERT_FIXTURES="$CARRY/fixtures"
  fi
fi
say "fixtures: ${SINGLEINSERT_FIXTURES:-none found (the GPU tests will fail)}"

# ---------------------------------------------------------------- 2. stages

run_stage env 60 10 bash -c '
  echo "## nvidia-smi"; nvidia-smi || true
  echo "## python torch"; python3 -c "import torch, sys; print(torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"\"); print(torch.utils.cmake_prefix_path)" || true
  echo "## cmake"; cmake --version | head -1 || true
  echo "## compiler"; c++ --version | head -1 || true
  echo "## nvcc"; nvcc --version | tail -2 || true
  echo "## libtorch"; "$NODE_BIN" scripts/find-libtorch.mjs || true'

run_stage typescript 180 30 "$NODE_BIN" node_modules/typescript/bin/tsc -p tsconfig.json
ts_rc=$?

BUILD_OK=0
run_stage build 420 60 "$NODE_BIN" scripts/build-native.mjs && BUILD_OK=1
if [ "$BUILD_OK" -eq 0 ] && grep -q "C++20 or later" "$DEST/build.log" 2>/dev/null; then
  say "build: libtorch wants C++20; building again with SINGLEINSERT_CXX_STANDARD=20"
  mv "$DEST/build.log" "$DEST/build-cxx17.log"
  export SINGLEINSERT_CXX_STANDARD=20
  run_stage build 420 60 "$NODE_BIN" scripts/build-native.mjs && BUILD_OK=1
fi
if [ "$BUILD_OK" -eq 0 ] && grep -q "device_info.cc" "$DEST/build.log" 2>/dev/null; then
  say "build: the CUDA extras did not compile; building again without them (SINGLEINSERT_CUDA_EXTRAS=0)"
  mv "$DEST/build.log" "$DEST/build-with-extras.log"
  export SINGLEINSERT_CUDA_EXTRAS=0
  run_stage build 300 60 "$NODE_BIN" scripts/build-native.mjs && BUILD_OK=1
fi

TESTS_OK=0
if [ "$BUILD_OK" -eq 1 ] && [ "$ts_rc" -eq 0 ]; then
  export SINGLEINSERT_CUDA=1
  if [ "$DRY_RUN" = 1 ]; then export SINGLEINSERT_GPU_TEST_DEVICE=cpu; fi
  run_stage gpu-tests 300 60 "$NODE_BIN" node_modules/jest/bin/jest.js test/gpu.test.ts --json --outputFile="$DEST/gpu-tests.json" --testTimeout=300000 && TESTS_OK=1
  run_stage bench 300 60 "$NODE_BIN" scripts/bench-gpu.mjs "${BENCH_ARGS[@]}" --out "$DEST/bench-gpu.json"
else
  printf 'gpu-tests\tskipped\t0\t-\nbench\tskipped\t0\t-\n' >> "$STAGES"
fi
# optional: the same UNet work in plain PyTorch (needs diffusers; records why not otherwise)
run_stage bench-pytorch 150 45 bash -c "python3 scripts/bench-pytorch.py $PT_ARGS > '$DEST/bench-pytorch.json'"

# ---------------------------------------------------------------- 3. summary

"$NODE_BIN" scripts/gpu-check-summary.mjs "$DEST" >> "$DEST/gpu-check.log" 2>&1 || say "summary failed (see gpu-check.log)"
say "done: $DEST/gpu-check.md"
[ "$BUILD_OK" -eq 1 ] && [ "$TESTS_OK" -eq 1 ]
