"""Bulk audit: read a JSONL of flagged answers, explain each one, write pictures, reports and a
summary. Resumable (an item whose record.json exists is not explained again; every file is
written atomically, record.json last) and failure-isolated (a bad line, a missing or unreadable
image, a service error is recorded for its item; the batch goes on).

Output layout (DIR):
    index.html  summary.json  summary.csv
    items/<item>/overlay.png   the image with one heatmap panel per method, legend, colour bar
    items/<item>/report.html   the answer's tokens coloured by weight, flags, saliency, tables
    items/<item>/record.json   the explanation (the resume marker)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from ..images import ImageError, load_image
from ..service.config import ServiceConfig
from .backends import AuditItem, Backend, ItemError
from .overlay import png_bytes, render_overlay
from .record import PROXY_RULE, ItemRecord, clean_token
from .report import index_html, item_html

TRUTH_POSITIVE, TRUTH_NEGATIVE = "correct", "corrupted"
# The image limits a default service applies, so a local audit sees what the service would.
IMAGE_LIMITS = ServiceConfig()
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


# ---- input -------------------------------------------------------------------------------------
def read_jsonl(path: str | Path) -> tuple[list[AuditItem], list[dict[str, Any]]]:
    """Items, and one error row per line that cannot be an item (the batch continues)."""
    path = Path(path)
    base = path.resolve().parent
    items: list[AuditItem] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("a line must be a JSON object")
            except ValueError as err:
                errors.append(_error_row(f"line-{number}", "", "", "bad_line",
                                         f"line {number}: not JSON: {err}"))
                continue
            item_id = str(obj.get("id", "")).strip() or f"line-{number}"
            missing = [k for k in ("image", "question", "answer")
                       if not isinstance(obj.get(k), str) or not obj.get(k)]
            if missing:
                errors.append(_error_row(item_id, str(obj.get("question", "")),
                                         str(obj.get("answer", "")), "bad_line",
                                         f"line {number}: missing or empty {missing}"))
                continue
            if item_id in seen:
                errors.append(_error_row(item_id, obj["question"], obj["answer"], "bad_line",
                                         f"line {number}: duplicate id {item_id!r}"))
                continue
            seen.add(item_id)
            image = Path(obj["image"]).expanduser()
            truth = obj.get("truth")
            extra = {k: v for k, v in obj.items()
                     if k not in ("id", "image", "question", "answer", "truth")}
            items.append(AuditItem(item_id, image if image.is_absolute() else base / image,
                                   obj["question"], obj["answer"],
                                   None if truth is None else str(truth), number, extra))
    return items, errors


def item_dir_name(item_id: str) -> str:
    """A folder name for an id: the id itself when it is filename-safe, else a slug + hash."""
    if _SAFE.match(item_id) and item_id not in (".", ".."):
        return item_id
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", item_id).strip("._-")[:48] or "item"
    return f"{slug}-{hashlib.sha1(item_id.encode()).hexdigest()[:10]}"


# ---- output helpers ----------------------------------------------------------------------------
def write_atomic(path: Path, data: bytes | str) -> None:
    """Write to a temporary file in the same folder, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep a web server from serving the report
        with os.fdopen(fd, "wb") as handle:
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _error_row(item_id: str, question: str, answer: str, kind: str, message: str,
               truth: str | None = None) -> dict[str, Any]:
    return {"id": item_id, "question": question, "answer": answer, "truth": truth,
            "status": "error", "error_kind": kind, "error": message}


def auroc(positives: Sequence[float], negatives: Sequence[float]) -> float | None:
    """P(a positive scores above a negative), ties count 1/2 (Mann-Whitney); None if a class is
    empty."""
    if not positives or not negatives:
        return None
    wins = 0.0
    for p in positives:
        for n in negatives:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(positives) * len(negatives))


# ---- one item ----------------------------------------------------------------------------------
def _load_done(folder: Path) -> dict[str, Any] | None:
    """The stored record when the item's outputs are complete, else None."""
    try:
        stored = json.loads((folder / "record.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not ((folder / "overlay.png").is_file() and (folder / "report.html").is_file()):
        return None
    return stored


def _still_valid(stored: dict[str, Any], item: AuditItem, backend: Backend) -> bool:
    """A stored result is reused only for the same question and answer, the same methods (when
    the backend names them) and the same model version (when the backend knows it before
    asking)."""
    record = stored.get("record", {})
    if (stored.get("item", {}).get("answer"), stored.get("item", {}).get("question")) != \
            (item.answer, item.question):
        return False
    methods = tuple(getattr(backend, "methods", ()) or ())
    if methods and tuple(record.get("maps", {})) != methods:
        return False
    version = getattr(backend, "model_version", None)
    return not version or record.get("model", {}).get("version") == version


def _explain_item(item: AuditItem, backend: Backend, out: Path) -> dict[str, Any]:
    folder = out / "items" / item_dir_name(item.id)
    stored = _load_done(folder)
    if stored is not None and _still_valid(stored, item, backend):
        return {"item": item, "record": ItemRecord.from_dict(stored["record"]),
                "status": "resumed", "total_s": stored.get("total_s")}
    try:
        data = item.image_path.read_bytes()
    except OSError as err:
        raise ItemError("image_not_found", f"{item.image_path}: {err.strerror or err}") from None
    try:
        image = load_image(data, max_pixels=IMAGE_LIMITS.max_image_pixels,
                           max_aspect_ratio=IMAGE_LIMITS.max_aspect_ratio)
    except ImageError as err:
        raise ItemError("image_unreadable", f"{item.image_path}: {err.message}") from None
    start = time.perf_counter()
    record = backend.explain(item, image, data)
    total = time.perf_counter() - start
    score, source = record.score()
    picture = render_overlay(image, record.maps, box=record.visual_box,
                             title=f"{item.id}: {item.question}",
                             subtitle=f"answer: {item.answer}   |   score {score:.3g} "
                                      f"({source})" if score is not None else
                             f"answer: {item.answer}")
    overlay = png_bytes(picture)
    write_atomic(folder / "overlay.png", overlay)
    write_atomic(folder / "report.html", item_html(item.id, item.question, item.answer, record,
                                                   overlay, truth=item.truth))
    write_atomic(folder / "record.json", json.dumps({
        "item": {"id": item.id, "image": str(item.image_path), "question": item.question,
                 "answer": item.answer, "truth": item.truth, **item.extra},
        "record": record.to_dict(), "total_s": total}, indent=1))
    return {"item": item, "record": record, "status": "ok", "total_s": total}


def _safe_explain(item: AuditItem, backend: Backend, out: Path) -> dict[str, Any]:
    try:
        return _explain_item(item, backend, out)
    except ItemError as err:
        return _error_row(item.id, item.question, item.answer, err.kind, err.message, item.truth)
    except Exception as err:  # noqa: BLE001 - one item's failure must not stop the batch
        return _error_row(item.id, item.question, item.answer, "internal",
                          f"{type(err).__name__}: {err}", item.truth)


# ---- the batch ---------------------------------------------------------------------------------
def run_audit(input_path: str | Path, out_dir: str | Path, backend: Backend,
              concurrency: int = 1, progress: bool = True,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Explain every item; returns the summary (also written to DIR/summary.json)."""
    from tqdm import tqdm

    out = Path(out_dir)
    (out / "items").mkdir(parents=True, exist_ok=True)
    items, results = read_jsonl(input_path)
    workers = max(1, int(concurrency))
    interrupted = False
    with tqdm(total=len(items), desc="audit", unit="item", disable=not progress) as bar:
        if workers == 1:
            try:
                for item in items:
                    results.append(_safe_explain(item, backend, out))
                    bar.update(1)
            except KeyboardInterrupt:
                interrupted = True
        else:
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="audit")
            futures = [pool.submit(_safe_explain, item, backend, out) for item in items]
            try:
                for future in as_completed(futures):
                    results.append(future.result())
                    bar.update(1)
            except KeyboardInterrupt:
                interrupted = True
                pool.shutdown(wait=False, cancel_futures=True)
            else:
                pool.shutdown(wait=True)
    summary = build_summary(results, out, backend.name, interrupted)
    if log:
        log(f"audit: {summary['n_ok']} explained ({summary['n_resumed']} resumed), "
            f"{summary['n_errors']} failed; ranked by {summary['score_source']}"
            + (f"; AUROC {summary['auroc']:.3f}" if summary.get("auroc") is not None else ""))
    if interrupted:
        raise KeyboardInterrupt
    return summary


def build_summary(results: list[dict[str, Any]], out: Path, backend: str,
                  interrupted: bool = False) -> dict[str, Any]:
    done = [r for r in results if "record" in r]
    failed = [r for r in results if "record" not in r]
    # One score for the whole batch: the service's grounding score when every item has one,
    # else the documented proxy for every item (never a mix).
    use_grounding = bool(done) and all(r["record"].grounding is not None for r in done)
    rows: list[dict[str, Any]] = []
    sources: set[str] = set()
    methods: list[str] = []
    models: set[str] = set()
    for r in done:
        item, rec = r["item"], r["record"]
        if use_grounding:
            score, source = rec.score()
        else:
            score, source = rec.proxy_score(), PROXY_RULE
        sources.add(source)
        flagged, flag_rule = rec.flagged()
        texts = [clean_token(rec.tokens[i].text).strip() for i in flagged if i < len(rec.tokens)]
        for m in rec.maps:
            if m not in methods:
                methods.append(m)
        models.add(f"{rec.model_name}@{rec.model_version}")
        folder = f"items/{item_dir_name(item.id)}"
        rows.append({
            "id": item.id, "question": item.question, "answer": item.answer,
            "truth": item.truth, "status": r["status"], "score": score,
            "score_source": source, "proxy_score": rec.proxy_score(),
            "min_logprob": rec.min_logprob(),
            "grounding_score": None if rec.grounding is None else rec.grounding.score,
            "flagged_tokens": texts, "flagged_indices": flagged, "flag_rule": flag_rule,
            "answer_tokens": [clean_token(t.text).strip() for t in rec.tokens],
            "error_kind": None, "error": None,
            "timings": rec.method_timings(), "total_s": r.get("total_s"),
            "model": f"{rec.model_name}@{rec.model_version}",
            "report": f"{folder}/report.html", "overlay": f"{folder}/overlay.png"})
    rows.sort(key=lambda row: (row["score"] is None, row["score"] or 0.0, row["id"]))
    rows += sorted(failed, key=lambda row: row["id"])
    summary: dict[str, Any] = {
        "n_items": len(results), "n_ok": len(done),
        "n_resumed": sum(r["status"] == "resumed" for r in done), "n_errors": len(failed),
        "interrupted": interrupted, "backend": backend,
        "score_source": sorted(sources)[0] if len(sources) == 1 else
        (" + ".join(sorted(sources)) or None),
        "score_note": ("grounding score from the engine/service" if use_grounding else
                       "no grounding score on every item: proxy = minimum LLR (ln p(token|image)"
                       " - ln p(token|blurred image)) over content tokens (stop words skipped);"
                       " lower = less supported by the image"),
        "model": " + ".join(sorted(models)) or None, "methods": methods,
        "auroc": None, "auroc_n": 0, "auroc_by_score": {}, "items": rows}
    labelled = [row for row in rows if row.get("truth") in (TRUTH_POSITIVE, TRUTH_NEGATIVE)
                and row.get("score") is not None]
    if labelled:
        def split(key: str) -> tuple[list[float], list[float]]:
            pos = [r[key] for r in labelled if r["truth"] == TRUTH_POSITIVE and r[key] is not None]
            neg = [r[key] for r in labelled if r["truth"] == TRUTH_NEGATIVE and r[key] is not None]
            return pos, neg

        summary["auroc"] = auroc(*split("score"))
        summary["auroc_n"] = len(labelled)
        summary["auroc_by_score"] = {
            name: auroc(*split(key)) for name, key in
            (("proxy:min-llr-content", "proxy_score"), ("grounding", "grounding_score"),
             ("reference:min-logprob-content", "min_logprob"))
            if any(r[key] is not None for r in labelled)}
    write_atomic(out / "summary.json", json.dumps(summary, indent=1, default=str))
    write_atomic(out / "summary.csv", _csv(rows, methods))
    write_atomic(out / "index.html", index_html(rows, summary))
    return summary


def _csv(rows: list[dict[str, Any]], methods: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["id", "truth", "status", "score", "score_source", "answer", "question",
                     "flagged_tokens", "error_kind", "error",
                     *[f"time_{m}_s" for m in methods], "total_s", "report"])
    for r in rows:
        timings = r.get("timings") or {}
        writer.writerow([r["id"], r.get("truth") or "", r["status"],
                         "" if r.get("score") is None else f"{r['score']:.6g}",
                         r.get("score_source") or "", r["answer"], r["question"],
                         " | ".join(r.get("flagged_tokens") or []), r.get("error_kind") or "",
                         r.get("error") or "",
                         *["" if m not in timings else f"{timings[m]:.4f}" for m in methods],
                         "" if r.get("total_s") is None else f"{r['total_s']:.4f}",
                         r.get("report") or ""])
    return buf.getvalue()
