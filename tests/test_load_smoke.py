"""CI smoke of the load tooling (issue 8): a few seconds of load at concurrency 2 over REST and
gRPC through `python -m loadtests.run` (report JSON, table, PNG), and the cheapest fault
scenario: malformed and oversized requests mixed into normal load. One private TorchServe for
the module (loadtests.server, built on tests/integration/conftest.py's machinery). The full
fault suite is tests/test_load_faults.py (`make loadtest`)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `loadtests` lives at the repository root
    sys.path.insert(0, str(REPO))

from loadtests import loadgen, run, scenarios  # noqa: E402
from loadtests.server import local_torchserve  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server():
    try:
        with local_torchserve() as s:
            yield s
    except RuntimeError as err:
        if "java" in str(err):
            pytest.skip(str(err))
        raise


def test_smoke_load_concurrency_2_reports_and_accounts(server, tmp_path):
    out = tmp_path / "load"
    code = run.main(["--rest", server.rest, "--grpc", server.grpc, "--out", str(out),
                     "--profiles", "default", "--concurrency", "2", "--step-seconds", "3",
                     "--step-requests", "20", "--warmup", "1", "--scenes", "4",
                     "--max-total-seconds", "60"])
    report = json.loads((out / "report.json").read_text())
    assert code == 0, report["problems"]
    assert [(s["transport"], s["concurrency"]) for s in report["steps"]] == [("rest", 2),
                                                                            ("grpc", 2)]
    for step in report["steps"]:
        m = step["summary"]
        assert m["sent"] == len(step["results"]) == m["ok"] + m["errors"], m
        assert m["errors_without_kind"] == 0
        assert m["ok"] >= 1, m
        # Only job-ticket rejections left over at the step's end may fail; nothing else.
        assert all(loadgen.is_rejection(k) for k in m["errors_by_kind"]), m["errors_by_kind"]
        assert m["first_message_s"]["p50"] <= m["latency_s"]["p50"], m  # the answer came first
        assert m["response_bytes_mean"] > 0
    assert (out / "table.md").read_text().count("\n") == 4
    assert (out / "load-latency.png").stat().st_size > 5000


def test_smoke_malformed_mixed_into_normal_load(server):
    traffic = asyncio.run(scenarios.mixed_malformed(server, seconds=3.0))
    assert traffic.accounting_problems() == [], traffic.summary()
    normal = traffic.by_label("normal")
    bad = [r for r in traffic.results if r.label != "normal"]
    assert {r.transport for r in normal if r.kind == "ok"} == {"rest", "grpc"}, traffic.summary()
    assert [r for r in normal if r.kind != "ok"] == [], traffic.summary()
    wrong = [(r.transport, r.label, r.kind, r.message) for r in bad if not r.expected]
    assert wrong == [], wrong
    # Each malformation reached its rejection on each transport that can carry it.
    assert len(bad) == sum(1 for s in loadgen.malformed_specs(include_large=False)
                           for body in (s.rest_body, s.grpc_input) if body is not None) + 4
