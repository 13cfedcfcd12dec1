#!/usr/bin/env bash
# `make serve`: build model_store/lvlm.mar, start TorchServe on 127.0.0.1 with
# deploy/config.properties (REST :8080, management :8081, metrics :8082, gRPC :7070), wait until
# the model's worker is READY (not just /ping), then send a real request and show the answer.
#
#   deploy/scripts/serve.sh            # the embedded model (model_store/tiny-shapes-llava)
#   LVLM_MODEL_DIR=/path/to/hf-model deploy/scripts/serve.sh
#   TS_CONFIG=my.properties deploy/scripts/serve.sh     # other ports/addresses (read from it)
#
# Stop with `make stop`. Logs: logs/ (TorchServe's own) and logs/torchserve.out.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
BIN="$ROOT/.venv/bin"
[ -x "$BIN/torchserve" ] || BIN="$(dirname "$(command -v torchserve)")"
export PATH="$BIN:$PATH"
TS_CONFIG="${TS_CONFIG:-deploy/config.properties}"
prop() { sed -n "s/^$1=//p" "$TS_CONFIG" | tail -n 1; }
REST="$(prop inference_address)"; REST="${REST:-http://127.0.0.1:8080}"
MANAGEMENT="$(prop management_address)"; MANAGEMENT="${MANAGEMENT:-http://127.0.0.1:8081}"
METRICS="$(prop metrics_address)"; METRICS="${METRICS:-http://127.0.0.1:8082}"
GRPC="127.0.0.1:$(prop grpc_inference_port)"; [ "$GRPC" != "127.0.0.1:" ] || GRPC=127.0.0.1:7070
STORE="$(prop model_store)"; STORE="${STORE:-model_store}"
READY_TIMEOUT_S="${READY_TIMEOUT_S:-240}"
mkdir -p logs

CONFIG=deploy/model-config.yaml
if [ -n "${LVLM_MODEL_DIR:-}" ]; then
  CONFIG=logs/model-config.yaml
  "$BIN/python" - "$LVLM_MODEL_DIR" "$CONFIG" <<'EOF'
import sys
from pathlib import Path
import yaml
cfg = yaml.safe_load(Path("deploy/model-config.yaml").read_text())
cfg["handler"]["model_dir"] = str(Path(sys.argv[1]).resolve())
Path(sys.argv[2]).write_text(yaml.safe_dump(cfg))
EOF
fi
MODEL_DIR="$("$BIN/python" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["handler"]["model_dir"])' "$CONFIG")"
if [ ! -f "$MODEL_DIR/config.json" ]; then
  echo "serve.sh: no model at $MODEL_DIR (set LVLM_MODEL_DIR or train: lvlm-attribution train)" >&2
  exit 1
fi

if curl -s -o /dev/null "$MANAGEMENT/models"; then
  echo "serve.sh: a TorchServe already answers at $MANAGEMENT; stop it first (make stop)" >&2
  exit 1
fi
bash deploy/scripts/build_mar.sh --config "$CONFIG" --out "$STORE"

# `torchserve --start` returns at once but Java keeps the caller's stdout: send it to a file.
"$BIN/torchserve" --start --ncs --ts-config "$TS_CONFIG" >logs/torchserve.out 2>&1 </dev/null
sleep 1
if grep -q "already running" logs/torchserve.out; then
  echo "serve.sh: $(cat logs/torchserve.out) (TorchServe keeps one pid file per \$TMPDIR)" >&2
  exit 1
fi

echo -n "serve.sh: waiting for model lvlm to be READY "
deadline=$((SECONDS + READY_TIMEOUT_S))
until "$BIN/python" deploy/scripts/probe_model_ready.py --url "$MANAGEMENT" --model lvlm \
      >/dev/null 2>&1; do
  if [ $SECONDS -ge $deadline ]; then
    echo; echo "serve.sh: not READY after ${READY_TIMEOUT_S}s; see logs/model_log.log" >&2
    tail -n 30 logs/model_log.log >&2 || true
    exit 1
  fi
  echo -n "."; sleep 1
done
echo " ready."

SCENE_JSON="$("$BIN/lvlm-attribution" scene --seed 3 --kind color --out logs/example.png)"
QUESTION="$("$BIN/python" -c 'import json, sys; print(json.loads(sys.argv[1])["question"])' "$SCENE_JSON")"
EXPECTED="$("$BIN/python" -c 'import json, sys; print(json.loads(sys.argv[1])["answer"])' "$SCENE_JSON")"

cat <<EOF

TorchServe is serving model "lvlm": REST $REST, gRPC $GRPC, metrics $METRICS/metrics
Example request (multipart upload; a JSON ExplainRequest works too, see docs/api.md):

  curl -s -F image=@logs/example.png -F 'question=$QUESTION' -F methods=glimpse,dexar \\
       $REST/predictions/lvlm

Response (truncated):
EOF
RESPONSE="$(curl -s -F image=@logs/example.png -F "question=$QUESTION" -F methods=glimpse,dexar \
  "$REST/predictions/lvlm")"
echo "  ${RESPONSE:0:400}..."
echo
echo "The same over gRPC, summarized:  lvlm-attribution call --url grpc://$GRPC --image logs/example.png --question '$QUESTION'"
"$BIN/lvlm-attribution" call --url "grpc://$GRPC" --image logs/example.png \
  --question "$QUESTION" | sed 's/^/  /'
echo
echo "Expected answer for this scene: $EXPECTED"
echo "Stop with: make stop"
