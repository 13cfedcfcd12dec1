"""Audit tooling: explain flagged answers in bulk, with pictures people can read (docs/audit.md).

    from lvlm_attribution.audit import LocalBackend, ServiceBackend, run_audit
    summary = run_audit("flagged.jsonl", "out/", LocalBackend(explainer), concurrency=2)
"""

from .backends import AuditItem, Backend, ItemError, LocalBackend, ServiceBackend
from .record import ItemRecord
from .runner import auroc, read_jsonl, run_audit

__all__ = ["AuditItem", "Backend", "ItemError", "ItemRecord", "LocalBackend", "ServiceBackend",
           "auroc", "read_jsonl", "run_audit"]
