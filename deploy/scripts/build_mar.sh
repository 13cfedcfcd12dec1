#!/usr/bin/env bash
# Build the TorchServe model archive for model `lvlm`.
#
#   deploy/scripts/build_mar.sh [--config deploy/model-config.yaml] [--out model_store]
#                               [--format default|no-archive] [--handler handlers/lvlm_handler.py]
#                               [--name lvlm] [--version X] [--model-dir PATH]
#
# default    -> <out>/lvlm.mar  (zip; for the small embedded CPU model)
# no-archive -> <out>/lvlm/     (plain directory with MAR-INF/MANIFEST.json; for the GPU image,
#               so nothing multi-GB is ever zipped; the weights themselves live on a volume)
#
# The archive holds only the handler module(s) and the model config. The engine package
# `lvlm_attribution` is pip-installed in the environment/image, and model weights are read from
# the `handler.model_dir` named in the config, so neither is archived.
# --model-dir PATH archives a copy of the config with `handler.model_dir` set to PATH (the image
# uses it to point the CPU archive at /opt/lvlm/model_store/tiny-shapes-llava: a relative path
# resolves against the repository, which an installed package does not have).
# Run from anywhere; relative paths are taken relative to the repository root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

CONFIG="deploy/model-config.yaml"
OUT="model_store"
FORMAT="default"
HANDLER="handlers/lvlm_handler.py"
NAME="lvlm"
VERSION="${MODEL_VERSION:-}"
MODEL_DIR=""

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --config) CONFIG="$2"; shift 2 ;;
    --config=*) CONFIG="${1#*=}"; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#*=}"; shift ;;
    --format) FORMAT="$2"; shift 2 ;;
    --format=*) FORMAT="${1#*=}"; shift ;;
    --handler) HANDLER="$2"; shift 2 ;;
    --handler=*) HANDLER="${1#*=}"; shift ;;
    --name) NAME="$2"; shift 2 ;;
    --name=*) NAME="${1#*=}"; shift ;;
    --version) VERSION="$2"; shift 2 ;;
    --version=*) VERSION="${1#*=}"; shift ;;
    --model-dir) MODEL_DIR="$2"; shift 2 ;;
    --model-dir=*) MODEL_DIR="${1#*=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build_mar.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

die() { echo "build_mar.sh: $*" >&2; exit 1; }

case "$FORMAT" in default|no-archive) ;; *) die "--format must be default or no-archive, got '$FORMAT'" ;; esac
[ -f "$CONFIG" ] || die "model config not found: $CONFIG"
[ -f "$HANDLER" ] || die "handler not found: $HANDLER"

if [ -n "$MODEL_DIR" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
  tmp_cfg_dir="$(mktemp -d)"
  trap 'rm -rf "$tmp_cfg_dir"' EXIT
  "$PY" - "$CONFIG" "$tmp_cfg_dir/$(basename "$CONFIG")" "$MODEL_DIR" <<'PYEOF'
import sys

import yaml

src, dst, model_dir = sys.argv[1:4]
cfg = yaml.safe_load(open(src))
cfg.setdefault("handler", {})["model_dir"] = model_dir
with open(dst, "w") as f:
    f.write(f"# {src} with handler.model_dir overridden by build_mar.sh --model-dir\n")
    yaml.safe_dump(cfg, f, sort_keys=False)
PYEOF
  CONFIG="$tmp_cfg_dir/$(basename "$CONFIG")"
fi

if [ -x "$ROOT/.venv/bin/torch-model-archiver" ]; then
  ARCHIVER="$ROOT/.venv/bin/torch-model-archiver"
elif command -v torch-model-archiver >/dev/null 2>&1; then
  ARCHIVER="$(command -v torch-model-archiver)"
else
  die "torch-model-archiver not found (run 'make setup' or pip install torch-model-archiver==0.12.0)"
fi

if [ -z "$VERSION" ]; then
  VERSION="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || true)"
  VERSION="${VERSION:-1.0}"
fi

# Other Python modules next to the handler (helpers it imports) travel as extra files.
handler_dir="$(dirname "$HANDLER")"
extra=()
for f in "$handler_dir"/*.py; do
  [ -e "$f" ] || continue
  [ "$f" = "$HANDLER" ] && continue
  case "$(basename "$f")" in __init__.py|test_*) continue ;; esac
  extra+=("$f")
done
extra_csv="$(IFS=,; echo "${extra[*]:-}")"

mkdir -p "$OUT"
if [ "$FORMAT" = "no-archive" ]; then
  target="$OUT/$NAME"
  rm -rf "$target"
else
  target="$OUT/$NAME.mar"
fi

args=(--model-name "$NAME" --version "$VERSION" --handler "$HANDLER"
      --config-file "$CONFIG" --export-path "$OUT" --archive-format "$FORMAT" --force)
[ -n "$extra_csv" ] && args+=(--extra-files "$extra_csv")

"$ARCHIVER" "${args[@]}"

if [ "$FORMAT" = "no-archive" ]; then
  [ -f "$target/MAR-INF/MANIFEST.json" ] || die "archiver did not produce $target/MAR-INF/MANIFEST.json"
else
  [ -s "$target" ] || die "archiver did not produce $target"
fi
echo "build_mar.sh: wrote $target (config $CONFIG, format $FORMAT, version $VERSION)"
