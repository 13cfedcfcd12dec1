"""Regenerate the Python code for the protos in this folder (`make proto`).

    python proto/generate.py [--out DIR]

proto/google/rpc/status.proto (wire-identical to googleapis') only lets non-Python clients compile
inference.proto with `-I proto`; no Python is generated for it.

Writes `*_pb2.py`, `*_pb2.pyi` and (for services) `*_pb2_grpc.py` next to the package path of each
.proto under DIR (default: the repository root), e.g. proto/lvlm_attribution/api/v1/explain.proto
-> lvlm_attribution/api/v1/explain_pb2.py. Uses grpcio-tools' bundled protoc and the
google/rpc/status.proto shipped by googleapis-common-protos. tests/test_proto_generated.py
regenerates into a temporary folder and fails when the checked-in code differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
PAYLOAD = ["lvlm_attribution/api/v1/explain.proto"]
SERVICES = ["lvlm_attribution/api/torchserve/inference.proto",
            "lvlm_attribution/api/v1/explainer.proto"]


def include_paths() -> list[str]:
    import google.rpc.status_pb2 as status  # googleapis-common-protos: ships status.proto
    import grpc_tools

    return [str(PROTO_ROOT), str(Path(grpc_tools.__file__).parent / "_proto"),
            str(Path(status.__file__).parents[2])]


def generate(out: Path) -> None:
    from grpc_tools import protoc

    includes = [f"-I{p}" for p in include_paths()]
    outputs = [f"--python_out={out}", f"--pyi_out={out}"]
    for files, extra in ((PAYLOAD, []), (SERVICES, [f"--grpc_python_out={out}"])):
        rc = protoc.main(["grpc_tools.protoc", *includes, *outputs, *extra, *files])
        if rc != 0:
            raise SystemExit(f"protoc failed ({rc}) on {files}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
