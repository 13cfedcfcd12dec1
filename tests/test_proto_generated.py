"""The checked-in generated code matches proto/ (the CI half of `make proto`)."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GENERATED = REPO / "lvlm_attribution" / "api"


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "proto" / "generate.py"), "--out", str(tmp_path)],
                   check=True)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*"))
    assert fresh, "protoc produced nothing"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, REPO / p, shallow=False)]
    assert not stale, f"generated code is out of date, run `make proto`: {stale}"
    checked_in = sorted(p.relative_to(REPO) for p in GENERATED.rglob("*_pb2*"))
    assert checked_in == fresh, "generated files without a .proto, or missing ones"
