#!/usr/bin/env bash
# `make k8s-validate` and tests/test_deploy.py run this. Offline; ~10 s.
#  1. render every overlay under k8s/overlays with `kubectl kustomize` and validate every object
#     strictly: built-in kinds with kubernetes-validate, CRDs against deploy/schemas/ (jsonschema);
#  2. `promtool check rules` on the PrometheusRule groups of every overlay and
#     `promtool test rules` on tests/deploy/alerts_test.yaml (alert unit tests on series named
#     exactly as TorchServe exports them).
# kubectl is required (fails with a clear message). promtool is optional: if it is missing and
# apt-get is usable (root), the Debian package `prometheus` is installed with
# --no-install-recommends; otherwise step 2 is skipped with the reason printed.
# Set K8S_VALIDATE_NO_INSTALL=1 to never install anything.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="${PYTHON:-python3}"; fi

KUBECTL="${KUBECTL:-kubectl}"
if ! command -v "$KUBECTL" >/dev/null 2>&1; then
  echo "k8s-validate: FAIL: '$KUBECTL' not found on PATH. It renders the kustomize overlays" >&2
  echo "  (kubectl >= 1.27 bundles kustomize v5; install kubectl, or set KUBECTL=/path/to/kubectl)." >&2
  exit 2
fi
if ! "$PY" -c 'import kubernetes_validate, jsonschema' 2>/dev/null; then
  echo "k8s-validate: FAIL: python packages kubernetes-validate and jsonschema are missing" >&2
  echo "  (pip install -e '.[dev]')." >&2
  exit 2
fi

echo "k8s-validate: $("$KUBECTL" version --client 2>/dev/null | tr '\n' ' ')"
RULES_DIR="$(mktemp -d)"
trap 'rm -rf "$RULES_DIR"' EXIT

"$PY" deploy/scripts/k8s_validate.py --kubectl "$KUBECTL" --rules-out "$RULES_DIR" "$@"

# ---- promtool -----------------------------------------------------------------------------
why=""
if ! command -v promtool >/dev/null 2>&1; then
  if [ "${K8S_VALIDATE_NO_INSTALL:-0}" = "1" ]; then
    why="promtool not on PATH and K8S_VALIDATE_NO_INSTALL=1"
  elif ! command -v apt-get >/dev/null 2>&1; then
    why="promtool not on PATH and no apt-get to install Debian's 'prometheus' package"
  elif [ "$(id -u)" != "0" ]; then
    why="promtool not on PATH and not root (apt-get install prometheus needs root)"
  else
    echo "k8s-validate: promtool missing, installing Debian package 'prometheus' (no recommends)"
    log="$(mktemp)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
             --no-install-recommends prometheus; } >"$log" 2>&1; then
      why="apt-get install prometheus failed: $(tail -n 2 "$log" | tr '\n' ' ')"
    fi
    rm -f "$log"
  fi
fi
if ! command -v promtool >/dev/null 2>&1; then
  echo "k8s-validate: SKIP promtool checks: ${why:-promtool not found after installation}"
  exit 0
fi
echo "k8s-validate: $(promtool --version 2>&1 | head -1)"
shopt -s nullglob
rules=("$RULES_DIR"/*.rules.yaml)
if [ ${#rules[@]} -eq 0 ]; then
  echo "k8s-validate: FAIL: no PrometheusRule rendered by any overlay" >&2
  exit 1
fi
promtool check rules "${rules[@]}"
# the unit tests load the rules of the gpu overlay (the one with monitoring + autoscaling)
cp "$RULES_DIR/gpu__lvlm-attribution.rules.yaml" "$RULES_DIR/lvlm.rules.yaml"
cp tests/deploy/alerts_test.yaml "$RULES_DIR/alerts_test.yaml"
(cd "$RULES_DIR" && promtool test rules alerts_test.yaml)
echo "k8s-validate: promtool checks passed"
