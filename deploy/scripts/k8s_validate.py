"""Render every kustomize overlay and validate each object strictly against its schema.

    python deploy/scripts/k8s_validate.py [--k8s-version 1.32.0] [--kubectl kubectl]
                                          [--rules-out DIR] [overlay ...]

- Overlays: every directory under k8s/overlays/ with a kustomization.yaml (or those named).
- Built-in kinds: `kubernetes-validate` (offline, strict: unknown fields are errors).
- CRD kinds (PodMonitor, PrometheusRule, ScaledObject): kubernetes-validate has no schema for
  them (SchemaNotFoundError), so they are checked with `jsonschema` against the strict schemas
  vendored in deploy/schemas/<group>/<kind>_<version>.json. A kind with no schema is an error.
- --rules-out DIR: also write each PrometheusRule's spec as a plain Prometheus rules file
  (DIR/<overlay>__<name>.rules.yaml) for `promtool check rules` (see k8s_validate.sh).
Exit status 0 only when every overlay rendered and every object validated.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ROOT / "k8s" / "overlays"
SCHEMAS = ROOT / "deploy" / "schemas"
DEFAULT_K8S_VERSION = "1.32.0"


def find_overlays(names: list[str]) -> list[Path]:
    if names:
        return [Path(n) if Path(n).is_dir() else OVERLAYS / n for n in names]
    return sorted(p.parent for p in OVERLAYS.glob("*/kustomization.yaml"))


def render(overlay: Path, kubectl: str) -> list[dict]:
    proc = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay} failed:\n{proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def crd_schema_path(doc: dict) -> Path:
    group, _, version = doc.get("apiVersion", "").rpartition("/")
    return SCHEMAS / group / f"{doc.get('kind', '').lower()}_{version}.json"


def validate_doc(doc: dict, k8s_version: str) -> str:
    """Returns "k8s" or "crd" (which validator passed); raises on any problem."""
    try:
        kubernetes_validate.validate(doc, k8s_version, strict=True)
        return "k8s"
    except kubernetes_validate.SchemaNotFoundError:
        pass
    path = crd_schema_path(doc)
    if not path.is_file():
        raise LookupError(f"no schema for {doc.get('apiVersion')} {doc.get('kind')}: neither "
                          f"kubernetes-validate nor {path.relative_to(ROOT)}")
    schema = json.loads(path.read_text())
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    errors = sorted((_deepest(e) for e in validator.iter_errors(doc)),
                    key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [f"  at /{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}"
                 for e in errors[:10]]
        raise ValueError(f"{path.relative_to(ROOT)}:\n" + "\n".join(lines))
    return "crd"


def _deepest(error: jsonschema.ValidationError) -> jsonschema.ValidationError:
    """For anyOf/oneOf failures, report the most specific sub-error (e.g. the unknown field)."""
    while error.context:
        error = jsonschema.exceptions.best_match(
            [e for e in error.context if e.validator != "type"] or error.context)
    return error


def name_of(doc: dict) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overlays", nargs="*")
    ap.add_argument("--k8s-version", default=DEFAULT_K8S_VERSION)
    ap.add_argument("--kubectl", default="kubectl")
    ap.add_argument("--rules-out", type=Path)
    args = ap.parse_args(argv)

    overlays = find_overlays(args.overlays)
    if not overlays:
        print(f"k8s-validate: no overlays found under {OVERLAYS}", file=sys.stderr)
        return 1
    failures = 0
    for overlay in overlays:
        label = overlay.name
        try:
            docs = render(overlay, args.kubectl)
        except (RuntimeError, OSError, yaml.YAMLError) as exc:
            print(f"FAIL {label}: {exc}")
            failures += 1
            continue
        counts = {"k8s": 0, "crd": 0}
        for doc in docs:
            try:
                counts[validate_doc(doc, args.k8s_version)] += 1
            except (kubernetes_validate.ValidationError, kubernetes_validate.InvalidSchemaError,
                    LookupError, ValueError) as exc:
                msg = getattr(exc, "message", None) or str(exc)
                print(f"FAIL {label}: {name_of(doc)}: {msg}")
                failures += 1
            if args.rules_out and doc.get("kind") == "PrometheusRule":
                args.rules_out.mkdir(parents=True, exist_ok=True)
                out = args.rules_out / f"{label}__{doc['metadata']['name']}.rules.yaml"
                out.write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]},
                                              sort_keys=False))
        print(f"ok   {label}: {len(docs)} objects ({counts['k8s']} built-in against Kubernetes "
              f"{args.k8s_version} strict, {counts['crd']} CRD objects against deploy/schemas)")
    if failures:
        print(f"k8s-validate: {failures} failure(s)")
        return 1
    print(f"k8s-validate: {len(overlays)} overlay(s) valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
