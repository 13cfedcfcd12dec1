"""`evaluate`: attribution maps against the planted world's ground truth, on held-out scenes.

For every scene (held-out seeds `held_out(EVALUATE_STREAM + seed, i)`, disjoint from model-eval's
`held_out(seed, i)` and from grounding-eval's stream), in audit mode — teacher-forced on the
CORRECT answer, so every map explains the right answer:

* every requested method (and variant, see `parse_methods`) via `Explainer.explain` — one call
  with all methods per scene; variants of a method already requested need one more call each
  (one config per method per call);
* three reference maps: uniform (chance), random (seeded by the scene) and a centre prior;
* metrics per map (definitions: docs/metrics.md): EPG, NSS, best IoU, soft-IoU, SNR against the
  evidence mask (NaN for absent-object questions: empty mask), deletion/insertion AUC, perplexity
  AUC (positive/negative) and, for methods with token weights, token SNR (content vs filler).

Deletion/insertion score: the mean probability of the answer's CONTENT tokens (the world's
per-word flags: the words the image decides) — the planted truth of which tokens depend on the
image, the same for every method and independent of the model's own LLR (which can select filler
tokens or fall back when the model is unsure). The paper's score (mean probability of the
LLR-selected tokens, alpha = 1) is recorded too (`deletion_llr`, `insertion_llr`); K is the
engine's (`llr.select_for_context`: the LLR every explanation reports, one forward of the image
and its blur). Both scores come from the same scored images (a per-scene cache keyed by image
bytes), so the second costs no forward. The blurred baseline Ĩ is the engine's `blur_baseline`.
Perplexity AUC uses all answer tokens (DEX-AR) and fills removed pixels with the mean colour of
the first 256 scenes of the stream (fixed, so a resumed or extended run uses the same colour).

Efficiency: one blurred baseline per scene shared by every map; every perturbed image is scored
once per scene (cache), in batches (`batch_size`) of one teacher-forced forward each.

Resumable output: `--out FILE` gets a header line and then one JSON line per finished scene; a
rerun with the same settings skips the scenes already in the file (a torn last line is dropped)
and aggregates everything at the end: mean and 95% CI per metric, per method, overall and per
question kind.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..context import AttributionContext
from ..engine import Explainer
from ..faithfulness import ImageScorer
from ..llr import select_for_context
from ..methods.registry import get_method
from ..perturbation import blur_baseline
from ..schema import ExplainOptions
from ..world.scenes import KINDS, Sample, generate, held_out
from .alignment import nss
from .localization import best_iou, energy_pointing_game, snr, soft_iou, token_snr
from .maps import centre_prior, random_map, uniform_map
from .perturbation import (
    dataset_mean_colour,
    deletion_insertion,
    mean_token_probability,
    perplexity_auc,
)
from .stats import mean_ci95, median_ci95

EVALUATE_STREAM = 20_000  # scenes: held_out(EVALUATE_STREAM + seed, i)
FILL_SCENES = 256  # perplexity-AUC fill colour: mean colour of the stream's first 256 scenes
REFERENCE_MAPS = ("uniform", "random", "centre")
# Token weight used for token SNR, per method (ReLU applied: token_snr needs w >= 0).
TOKEN_WEIGHT_KEY = {"glimpse": "beta", "dexar": "delta", "igos": "llr"}
LOCALIZATION = ("epg", "nss", "best_iou", "soft_iou", "snr")
PERTURBATION = ("deletion", "insertion", "deletion_llr", "insertion_llr", "ppl_pos", "ppl_neg")
METRICS = LOCALIZATION + PERTURBATION + ("token_snr",)
# Direction of "better" for each metric (table and acceptance checks).
HIGHER_IS_BETTER = {"epg": True, "nss": True, "best_iou": True, "soft_iou": True, "snr": True,
                    "deletion": False, "insertion": True, "deletion_llr": False,
                    "insertion_llr": True, "ppl_pos": True, "ppl_neg": False, "token_snr": True}


# ---- method variants -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One requested map: a registered method with setting overrides, shown as `label`."""

    label: str
    method: str
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.overrides)


def _value(text: str) -> Any:
    low = text.strip()
    if low.lower() in ("true", "false", "null", "none"):
        return {"true": True, "false": False}.get(low.lower())
    try:
        return json.loads(low)
    except json.JSONDecodeError:
        return low


def parse_methods(text: str | Sequence[str],
                  method_settings: dict[str, dict[str, Any]] | None = None) -> list[Variant]:
    """Parse `--methods`: comma-separated `name` or `name:key=value[:key=value...]`.

    Examples: "glimpse,dexar", "glimpse:depth_prior=false", "dexar:key_aggregation=mean:
    token_filter=false", "tmme:last_k_layers=2". Values are JSON (true/false/null, numbers,
    strings; bare words are strings). `method_settings` ({"igos": {"iterations": 3}}) applies to
    every variant of a method; a variant's own key=value wins. Each variant is validated against
    the method's config now, so a typo fails before any scene runs. Labels are the spec text.
    """
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    base = method_settings or {}
    unknown = sorted(set(base) - {i.split(":")[0] for i in items if i})
    if unknown:
        raise ValueError(f"--method-settings for methods not requested: {unknown}")
    variants: list[Variant] = []
    for item in items:
        if not item:
            continue
        name, *pairs = item.split(":")
        overrides = dict(base.get(name, {}))
        for pair in pairs:
            key, sep, raw = pair.partition("=")
            if not sep or not key:
                raise ValueError(f"bad setting {pair!r} in {item!r}; expected key=value")
            overrides[key.strip()] = _value(raw)
        get_method(name).make_config(overrides)  # raises on unknown method / field / value
        if item in {v.label for v in variants} or item in REFERENCE_MAPS:
            raise ValueError(f"duplicate or reserved method label {item!r}")
        variants.append(Variant(item, name, tuple(sorted(overrides.items()))))
    if not variants:
        raise ValueError("no methods requested")
    return variants


def explain_rounds(variants: Sequence[Variant]) -> list[list[Variant]]:
    """Group variants into explain calls holding at most one config per method."""
    rounds: list[list[Variant]] = []
    for v in variants:
        for r in rounds:
            if all(x.method != v.method for x in r):
                r.append(v)
                break
        else:
            rounds.append([v])
    return rounds


# ---- configuration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalConfig:
    scenes: int = 100  # total; question kinds in turn (kinds[i % len(kinds)])
    seed: int = 0
    methods: str = "glimpse,dexar"
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    kinds: tuple[str, ...] = KINDS
    igos_scenes: int | None = None  # iGOS++ (and its variants) only on scenes 0..K-1
    steps: int = 50  # deletion/insertion steps
    batch_size: int = 32  # images per scoring forward
    perturbation: bool = True  # False: skip deletion/insertion and perplexity AUC
    ppl_points: int = 11  # perplexity AUC at p = 0, 1/(k-1), ..., 1 (DEX-AR default grid: 11)
    shard: tuple[int, int] = (0, 1)  # (k, n): this process runs the scenes with index % n == k

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the file it extends (not `scenes`, not the
        shard: shards of one run are merged by `report_from_file`)."""
        d = asdict(self)
        d.pop("scenes")
        d.pop("batch_size")
        d.pop("shard")
        d["kinds"] = list(self.kinds)
        return d


def scene_plan(cfg: EvalConfig, count: int | None = None) -> list[tuple[int, int, str]]:
    """(index, world seed, kind) of the first `count` (default cfg.scenes) scenes."""
    n = cfg.scenes if count is None else count
    return [(i, held_out(EVALUATE_STREAM + cfg.seed, i), cfg.kinds[i % len(cfg.kinds)])
            for i in range(n)]


def fill_colour(cfg: EvalConfig) -> np.ndarray:
    return dataset_mean_colour(generate(s, k).image for _, s, k in scene_plan(cfg, FILL_SCENES))


# ---- scoring -------------------------------------------------------------------------------------
def scene_scorer(explainer: Explainer, sample: Sample, answer_ids: list[int],
                 batch_size: int = 32) -> ImageScorer:
    """The perturbation metrics' logprob_fn for a scene's fixed answer: the engine's scorer
    (the one behind the service's faithfulness scores), on the scene's audit-mode context."""
    prompt = explainer.prepare(Image.fromarray(sample.image), sample.question)
    ctx = AttributionContext(explainer.model, explainer.adapter, prompt, answer_ids)
    return ImageScorer(ctx, batch_size)


# ---- one scene -----------------------------------------------------------------------------------
def _safe(fn: Callable[[], float]) -> float:
    try:
        return float(fn())
    except ValueError:
        return float("nan")


def map_metrics(saliency: np.ndarray, sample: Sample) -> dict[str, float]:
    mask = sample.evidence
    if not mask.any():
        return {k: float("nan") for k in LOCALIZATION}
    return {"epg": energy_pointing_game(saliency, mask), "nss": nss(saliency, mask),
            "best_iou": best_iou(saliency, mask), "soft_iou": soft_iou(saliency, mask),
            "snr": snr(saliency, mask)}


def evaluate_scene(explainer: Explainer, sample: Sample, index: int, variants: Sequence[Variant],
                   cfg: EvalConfig, fill: np.ndarray) -> dict[str, Any]:
    """All maps and metrics of one scene: one JSON-able record."""
    start = time.perf_counter()
    image = sample.image
    pil = Image.fromarray(image)
    run_igos = cfg.igos_scenes is None or index < cfg.igos_scenes
    active = [v for v in variants if v.method != "igos" or run_igos]
    maps: dict[str, np.ndarray] = {}
    weights: dict[str, np.ndarray] = {}
    tokens = None
    grid = None
    for batch in explain_rounds(active):
        options = ExplainOptions(methods=tuple(v.method for v in batch),
                                 method_settings={v.method: v.settings for v in batch
                                                  if v.overrides})
        expl = explainer.explain(pil, sample.question, answer=sample.answer, options=options)
        tokens = tokens or expl.tokens
        grid = expl.grid
        for v in batch:
            out = expl.methods[v.method]
            maps[v.label] = np.asarray(out.visual_map, dtype=np.float64)
            key = TOKEN_WEIGHT_KEY.get(v.method)
            if key in out.token_weights:
                weights[v.label] = np.maximum(np.asarray(out.token_weights[key], float), 0.0)
    answer_ids = explainer.encode_answer(sample.answer)
    if grid is None:  # only iGOS requested and this scene is outside its subset
        grid = explainer.prepare(pil, sample.question).grid
    h, w = grid
    maps["uniform"] = uniform_map(h, w)
    maps["random"] = random_map(h, w, seed=sample.seed)
    maps["centre"] = centre_prior(h, w)
    aligned = len(answer_ids) == len(sample.answer_words)
    content = np.array(sample.content, dtype=bool) if aligned else None

    scorer = scene_scorer(explainer, sample, answer_ids, cfg.batch_size)
    # K (for *_llr): the engine's LLR and selection rule, alpha = 1 — the LLR every explanation
    # reports — on the scorer's context: one forward of the image and its blur.
    selected = select_for_context(scorer.ctx)[0].selected
    baseline = np.asarray(blur_baseline(pil))  # the engine's blur: Ĩ of every curve below
    # The curves' end points s(I), s(Ĩ), scored first, one image per forward (this batch layout
    # fixes the fp32 numbers of every curve; earlier runs used it too).
    lp0 = scorer(image[None])[0]
    scorer(baseline[None])
    content_pos = np.flatnonzero(content) if content is not None else np.arange(len(answer_ids))

    metrics: dict[str, dict[str, float]] = {}
    for label, saliency in maps.items():
        m = map_metrics(saliency, sample)
        if cfg.perturbation:
            di = deletion_insertion(saliency, image, baseline,
                                    lambda ims: mean_token_probability(scorer(ims), content_pos),
                                    steps=cfg.steps, batch_size=10_000)
            dl = deletion_insertion(saliency, image, baseline,
                                    lambda ims: mean_token_probability(scorer(ims), selected),
                                    steps=cfg.steps, batch_size=10_000)
            pp = perplexity_auc(saliency, image, scorer, fill, batch_size=10_000,
                                fractions=np.linspace(0.0, 1.0, cfg.ppl_points))
            m.update(deletion=di["deletion_auc"], insertion=di["insertion_auc"],
                     deletion_llr=dl["deletion_auc"], insertion_llr=dl["insertion_auc"],
                     ppl_pos=pp["positive_auc"], ppl_neg=pp["negative_auc"])
        if label in weights and content is not None:
            m["token_snr"] = _safe(lambda lb=label: token_snr(weights[lb], content))
        metrics[label] = {k: float(v) for k, v in m.items()}
    return {
        "type": "scene", "index": index, "seed": sample.seed, "kind": sample.kind,
        "question": sample.question, "answer": sample.answer,
        "mask_area": float(sample.evidence.mean()), "igos": run_igos and any(
            v.method == "igos" for v in variants),
        "p_content": float(np.exp(lp0[content_pos]).mean()),
        "llr_selected": [int(t) for t in selected],
        "probabilities": [round(t.probability, 6) for t in tokens] if tokens else None,
        "metrics": metrics, "images_scored": scorer.images_scored,
        "seconds": time.perf_counter() - start,
    }


# ---- resumable JSON lines ------------------------------------------------------------------------
def _clean(x: Any) -> Any:
    """JSON-safe: NaN -> null, +-inf -> "inf"/"-inf" (restored by `_restore`)."""
    if isinstance(x, float):
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def _restore_metric(v: Any) -> float:
    if v is None:
        return float("nan")
    if isinstance(v, str):
        return float(v)
    return float(v)


def load_done(path: Path, identity: dict[str, Any]) -> dict[int, dict]:
    """Scene records already in `path` (keyed by index). A missing file is created with the
    header; a file from different settings is refused; a torn last line is dropped."""
    if not path.exists() or path.stat().st_size == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"type": "header", "config": identity}) + "\n")
        return {}
    done: dict[int, dict] = {}
    good: list[str] = []
    torn = False
    for n, line in enumerate(path.read_text().splitlines()):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            torn = True
            continue
        if n == 0:
            if rec.get("type") != "header" or rec.get("config") != _clean(identity):
                raise ValueError(f"{path} holds a run with other settings: "
                                 f"{rec.get('config')} != {identity}; use another --out")
        elif rec.get("type") == "scene":
            done[int(rec["index"])] = rec
        good.append(line)
    if torn:
        path.write_text("".join(g + "\n" for g in good))
    return done


# ---- aggregation ---------------------------------------------------------------------------------
DELETION_STATISTIC = ("acceptance compares deletion AUC on the median with a percentile-bootstrap "
                      "95% CI (2000 resamples, seed 0); every metric also has mean +- t CI")


def _stat(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    mean, low, high = mean_ci95(finite)
    median, median_low, median_high = median_ci95(finite)
    return {"mean": mean, "low": low, "high": high, "median": median,
            "median_low": median_low, "median_high": median_high, "n": int(finite.size),
            "n_nan": int(np.isnan(arr).sum()), "n_inf": int(np.isinf(arr).sum())}


def aggregate(records: Sequence[dict], labels: Sequence[str]) -> dict[str, Any]:
    """Mean and 95% CI per metric and map, over all scenes and per question kind. NaN (undefined:
    empty mask, s_orig == s_blur) and inf (SNR with all energy inside) values are left out of the
    mean and counted (`n_nan`, `n_inf`)."""
    scopes: dict[str, list[dict]] = {"all": list(records)}
    for r in records:
        scopes.setdefault(r["kind"], []).append(r)
    out: dict[str, Any] = {}
    for scope, recs in scopes.items():
        with_mask = [r for r in recs if r["mask_area"] > 0]
        entry: dict[str, Any] = {"scenes": len(recs), "scenes_with_mask": len(with_mask),
                                 "mask_area": _stat([r["mask_area"] for r in with_mask]),
                                 "maps": {}}
        for label in labels:
            rows = [r["metrics"][label] for r in recs if label in r["metrics"]]
            if not rows:
                continue
            entry["maps"][label] = {"scenes": len(rows), **{
                metric: _stat([_restore_metric(row.get(metric)) for row in rows])
                for metric in METRICS if any(metric in row for row in rows)}}
        out[scope] = entry
    return out


def acceptance(summary: dict[str, Any], methods: Sequence[str] = ("glimpse", "dexar")) -> dict:
    """Issue 4's bar, per method: mean EPG >= 3x mean evidence-mask area; EPG higher (means, t
    CIs) and deletion AUC lower than each reference map with non-overlapping 95% CIs. Deletion is
    compared on medians with bootstrap CIs (`DELETION_STATISTIC`): its per-scene normalisation
    (s - s_blur)/(s_orig - s_blur) explodes where s_orig ~ s_blur, so its mean is not a usable
    location estimate (docs/quality.md shows both)."""
    allsc = summary["all"]
    area = allsc["mask_area"]["mean"]
    result = {}
    for method in methods:
        row = allsc["maps"].get(method)
        if row is None:
            continue
        checks: dict[str, Any] = {"epg_over_area": row["epg"]["mean"] / area if area else None}
        checks["epg_3x_area"] = bool(row["epg"]["mean"] >= 3 * area)
        for ref in REFERENCE_MAPS:
            other = allsc["maps"][ref]
            checks[f"epg_beats_{ref}"] = bool(row["epg"]["low"] > other["epg"]["high"])
            if "deletion" in row:
                checks[f"deletion_beats_{ref}"] = bool(
                    row["deletion"]["median_high"] < other["deletion"]["median_low"])
        checks["all"] = all(v for k, v in checks.items() if k != "epg_over_area")
        result[method] = checks
    return result


# ---- the run -------------------------------------------------------------------------------------
def run_evaluation(explainer: Explainer, cfg: EvalConfig, out: Path | None = None,
                   progress: bool = True) -> dict[str, Any]:
    variants = parse_methods(cfg.methods, cfg.method_settings)
    identity = {**cfg.identity(), "model_version": explainer.model_version}
    done = load_done(out, identity) if out is not None else {}
    fill = fill_colour(cfg)
    k, n = cfg.shard
    plan = [p for p in scene_plan(cfg) if p[0] not in done and p[0] % n == k]
    records = [r for i, r in sorted(done.items()) if i < cfg.scenes]
    skipped = len(records)
    with out.open("a") if out is not None else _NullWriter() as handle:
        for index, seed, kind in tqdm(plan, desc="evaluate", disable=not progress,
                                      mininterval=2, file=sys.stderr):
            record = _clean(evaluate_scene(explainer, generate(seed, kind), index, variants, cfg,
                                           fill))
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            records.append(record)
    return build_report(records, {**identity, "scenes": cfg.scenes}, explainer.model_name,
                        skipped, [float(c) for c in fill])


def build_report(records: Sequence[dict], config: dict[str, Any], model: str, resumed: int = 0,
                 fill: list[float] | None = None) -> dict[str, Any]:
    """The aggregated report (summary, acceptance) of scene records under `config`."""
    variants = parse_methods(config["methods"], config.get("method_settings"))
    labels = [v.label for v in variants] + list(REFERENCE_MAPS)
    summary = aggregate(records, labels)
    has_igos = any(v.method == "igos" for v in variants)
    igos_done = sum(1 for r in records if r.get("igos"))
    seconds = [r["seconds"] for r in records]
    return {
        "config": config, "model": model,
        "scenes_done": len(records), "scenes_resumed": resumed,
        "igos_scenes": igos_done if has_igos else None,
        "igos_note": (f"iGOS++ evaluated on {igos_done} of {len(records)} scenes "
                      f"(--igos-scenes {config.get('igos_scenes')})"
                      if config.get("igos_scenes") is not None and has_igos else None),
        "fill_colour": fill,
        "seconds_per_scene": float(np.mean(seconds)) if seconds else None,
        "deletion_score": "mean probability of the content tokens (world flags); *_llr: of the "
                          "LLR-selected tokens (alpha=1)",
        "deletion_statistic": DELETION_STATISTIC,
        "labels": labels, "summary": _clean(summary), "acceptance": acceptance(summary),
    }


def report_from_file(paths: Path | Sequence[Path], scenes: int | None = None) -> dict[str, Any]:
    """Aggregate (possibly still growing) --out files without a model: read-only, torn lines
    skipped; `scenes` keeps only indices below it. Several files (the shards of one run) must
    share one header; a scene in more than one file counts once."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    config: dict[str, Any] | None = None
    by_index: dict[int, dict] = {}
    for path in paths:
        lines = path.read_text().splitlines()
        header = json.loads(lines[0])["config"]
        if config is not None and header != config:
            raise ValueError(f"{path} holds a run with other settings than {paths[0]}")
        config = header
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("type") == "scene" and (scenes is None or rec["index"] < scenes):
                by_index.setdefault(int(rec["index"]), rec)
    records = [by_index[i] for i in sorted(by_index)]
    assert config is not None
    return build_report(records, {**config, "scenes": len(records)},
                        "from " + ", ".join(str(p) for p in paths))


class _NullWriter:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, _text: str) -> None:
        pass

    def flush(self) -> None:
        pass


# ---- printing ------------------------------------------------------------------------------------
TABLE_METRICS = ("epg", "nss", "best_iou", "soft_iou", "snr", "deletion", "insertion", "ppl_pos",
                 "ppl_neg", "token_snr")


def _cell(stat: dict | None) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    mean, low = stat["mean"], stat["low"]
    if low is None or (isinstance(low, float) and math.isnan(low)):
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {mean - low:.3f}"


def _map_rows(entry: dict[str, Any], metrics: Sequence[str], cell: Callable[[dict | None], str],
              with_n: bool) -> list[str]:
    """Markdown header and one row per map for the `metrics` present in this scope."""
    cols = [m for m in metrics if any(m in row for row in entry["maps"].values())]
    if not cols:
        return []
    arrows = {m: "↑" if HIGHER_IS_BETTER[m] else "↓" for m in cols}
    n_head, n_rule = ("n | ", "---|") if with_n else ("", "")
    lines = [f"| map | {n_head}" + " | ".join(f"{m} {arrows[m]}" for m in cols) + " |",
             f"|---|{n_rule}" + "---|" * len(cols)]
    for label, row in entry["maps"].items():
        n_cell = f"{row['scenes']} | " if with_n else ""
        lines.append(f"| {label} | {n_cell}" + " | ".join(cell(row.get(m)) for m in cols) + " |")
    return lines


def format_table(report: dict[str, Any], scope: str = "all",
                 metrics: Sequence[str] = TABLE_METRICS) -> str:
    """Markdown table: one row per map, mean ± 95% CI half-width per metric."""
    entry = report["summary"].get(scope)
    if entry is None:
        return ""
    head = (f"**{scope}**: {entry['scenes']} scenes ({entry['scenes_with_mask']} with an evidence "
            f"mask; mean mask area {_cell(entry['mask_area'])})\n\n")
    return head + "\n".join(_map_rows(entry, metrics, _cell, with_n=True)) + "\n"


MEDIAN_METRICS = ("deletion", "insertion", "deletion_llr", "insertion_llr")


def _median_cell(stat: dict | None) -> str:
    if not stat or stat.get("median") is None:
        return "—"
    low, high = stat.get("median_low"), stat.get("median_high")
    if low is None or (isinstance(low, float) and math.isnan(low)):
        return f"{stat['median']:.3f}"
    return f"{stat['median']:.3f} [{low:.3f}, {high:.3f}]"


def format_median_table(report: dict[str, Any], scope: str = "all",
                        metrics: Sequence[str] = MEDIAN_METRICS) -> str:
    """Markdown table of the ratio-normalised perturbation AUCs: median [bootstrap 95% CI]."""
    entry = report["summary"].get(scope)
    rows = _map_rows(entry, metrics, _median_cell, with_n=False) if entry is not None else []
    if not rows:
        return ""
    return f"**{scope}**, medians [95% bootstrap CI]:\n\n" + "\n".join(rows) + "\n"


def format_report(report: dict[str, Any], per_kind: bool = True) -> str:
    scopes = [k for k in report["summary"] if per_kind or k == "all"]
    parts = []
    for scope in scopes:
        parts += [format_table(report, scope), format_median_table(report, scope)]
    parts = [p for p in parts if p]
    if report.get("igos_note"):
        parts.append(report["igos_note"] + "\n")
    parts.append(format_acceptance(report["acceptance"]))
    return "\n".join(parts)


def format_acceptance(acceptance: dict[str, dict[str, Any]]) -> str:
    """Issue 4's bar as a table: one row per check, one column per method."""
    if not acceptance:
        return ""
    methods = list(acceptance)
    checks = [k for k in next(iter(acceptance.values())) if k not in ("epg_over_area", "all")]
    lines = ["acceptance (EPG: means, t CIs; deletion: medians, bootstrap CIs):\n",
             "| check | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    ratio = [f"{acceptance[m]['epg_over_area']:.2f}×" if acceptance[m].get("epg_over_area")
             else "—" for m in methods]
    lines.append("| mean EPG / mean mask area | " + " | ".join(ratio) + " |")
    for check in checks + ["all"]:
        cells = ["yes" if acceptance[m].get(check) else "**no**" for m in methods]
        lines.append(f"| {check} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
