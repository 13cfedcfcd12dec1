"""The hostile-input suite: every case in loadtests/hostile.py against the real TorchServe of
this test session, over REST and gRPC. Each must get its documented outcome (200 or a clear
4xx / INVALID_ARGUMENT / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED), never kill or wedge the worker,
and a valid request right after it must be answered. docs/reliability.md is the same catalogue
as a table (`python -m loadtests.hostile`)."""

from __future__ import annotations

import pytest

from loadtests.hostile import CASES, Target, run_case

pytestmark = pytest.mark.integration
PARAMS = [pytest.param(case, transport, id=f"{transport}: {case.name}")
          for case in CASES for transport in ("rest", "grpc") if transport in case.wires()]


@pytest.mark.parametrize(("case", "transport"), PARAMS)
def test_hostile_case(torchserve, case, transport) -> None:
    row = run_case(Target(torchserve.rest, torchserve.grpc), case, transport)
    assert row.problem is None, f"{row.problem}\n{torchserve.log_tail()}"
