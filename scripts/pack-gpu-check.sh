#!/usr/bin/env bash
# Packs what scripts/gpu-check.sh needs on a GPU machine that has no Node and no network into
# .gpu-carry/ (or the folder given): node.xz (this machine's node binary, xz-compressed; an official
# Node build runs on any glibc >= 2.28), node_modules.tar.xz (after `npm ci`), and fixtures.tar.xz
# (the subset of the reference fixtures test/gpu.test.ts reads). About 57 MB in all; copy the folder
# with the checkout (it is git-ignored).
#   scripts/pack-gpu-check.sh [dir]      env: NODE (default: node on PATH), SINGLEINSERT_FIXTURES
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DEST=${1:-$ROOT/.gpu-carry}
mkdir -p "$DEST"
NODE_BIN=${NODE:-$(command -v node)}
FIXTURES=${SINGLEINSERT_FIXTURES:-$ROOT/../shared/fixtures}
[ -f "$FIXTURES/README.md" ] || { echo "no fixtures at $FIXTURES (set SINGLEINSERT_FIXTURES)" >&2; exit 1; }
[ -d node_modules/jest ] || { echo "node_modules is incomplete: run npm ci first" >&2; exit 1; }

echo "node $("$NODE_BIN" --version) from $NODE_BIN -> $DEST/node.xz"
xz -T0 -6 -c "$NODE_BIN" > "$DEST/node.xz"
echo "node_modules -> $DEST/node_modules.tar.xz"
tar -cJhf "$DEST/node_modules.tar.xz" --exclude='node_modules/.cache' node_modules
echo "fixtures subset -> $DEST/fixtures.tar.xz"
cases=()
for c in unet vae text_encoder image_encoder dino_vit pipeline_ddim4 singleinsert_losses; do cases+=("cases/$c.json" "cases/$c.safetensors"); done
tar -cJf "$DEST/fixtures.tar.xz" -C "$FIXTURES" README.md tiny-sd/model_index.json tiny-sd/unet tiny-sd/vae tiny-sd/text_encoder \
  tiny-sd/tokenizer tiny-sd/scheduler tiny-sd/image_encoder tiny-sd/dino lora cases/index.json "${cases[@]}" \
  cases/images/face64.png cases/images/face64_mask.png
total=$(du -cb "$DEST"/node.xz "$DEST"/node_modules.tar.xz "$DEST"/fixtures.tar.xz | tail -1 | cut -f1)
du -h "$DEST"/*.xz
echo "total $((total / 1048576)) MiB"
if [ "$total" -gt $((64 * 1048576)) ]; then echo "warning: more than 64 MiB" >&2; fi
