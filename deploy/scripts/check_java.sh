#!/usr/bin/env bash
# TorchServe 0.12 needs Java 17 or newer (older JDKs fail with NoSuchMethodError).
set -euo pipefail
if ! command -v java >/dev/null 2>&1; then
  echo "Java 17 is required by TorchServe and was not found." >&2
  echo "Install it with: apt-get install -y openjdk-17-jre-headless   (Debian/Ubuntu)" >&2
  exit 1
fi
major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
if [ -z "$major" ] || [ "$major" -lt 17 ]; then
  echo "Java $major found; TorchServe needs Java 17 or newer." >&2
  echo "Install it with: apt-get install -y openjdk-17-jre-headless   (Debian/Ubuntu)" >&2
  exit 1
fi
