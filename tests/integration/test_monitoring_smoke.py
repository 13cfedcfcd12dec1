"""A smoke run of the monitoring cost command (loadtests/monitoring.py; the full run is in
docs/performance.md): the engine table and one served step per transport, on a real TorchServe
with the monitoring profile."""

from __future__ import annotations

import json

import pytest

from loadtests import monitoring

pytestmark = pytest.mark.integration


def test_monitoring_command_smoke(tmp_path, capsys) -> None:
    out = tmp_path / "report.json"
    assert monitoring.main(["--seconds", "1.5", "--servers", "batch8", "--engine-requests", "2",
                            "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["engine"]) >= {"answer only", "answer + LLR + DEX-AR", "answer + TAM"}
    assert report["engine"]["answer only"]["x_answer"] == 1.0
    rows = report["served"]["batch8"]["rows"]
    assert set(rows) == {f"{t} / {load}" for t in ("rest", "grpc")
                         for load in ("1 client", "16 clients, retry 10 ms")}
    for row in rows.values():
        assert row["ok"] > 0 and set(row["outcomes"]) == {"ok"}, row
    assert "| batch8 | rest / 1 client |" in capsys.readouterr().out
