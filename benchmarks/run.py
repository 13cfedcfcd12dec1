"""Speed and memory of every method's optimized path against its naive reference, one command
per scenario (benchmarks/configs.py):

    python -m benchmarks.run --scenario smoke                       # tiny, CPU, seconds
    python -m benchmarks.run --scenario embedded-cpu --json cpu.json
    python -m benchmarks.run --scenario gpu --json $OUT/bench.json  # all 7B scenarios, one call
    python -m benchmarks.run --table bench.json                     # print a saved run

Per scenario, in ONE process on one model: the plain SDPA forward over [image | prompt | answer]
(the unit every ratio refers to), answer generation (model.generate and the engine's path,
exactly T tokens), and each method's optimized path beside its naive reference. Naive references
that would take minutes at 7B are measured on a few tokens (layers, interpolants) and scaled up;
those rows say `extrapolated` and how. Times are wall-clock, CUDA-synchronized, after warm-up,
median of k; peak GPU memory is reset before every run. An out-of-memory or any error is
recorded for that measurement and the run goes on; the JSON is rewritten after every
measurement, so a run killed at its time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from lvlm_attribution.capture import CaptureSpec
from lvlm_attribution.context import AttributionContext
from lvlm_attribution.llr import select_for_context, token_llr
from lvlm_attribution.methods._common import forward_only_capture
from lvlm_attribution.methods.dexar import DexArConfig, reference_lens_gradients
from lvlm_attribution.methods.glimpse import GlimpseConfig, reference_glimpse
from lvlm_attribution.methods.igos import IgosConfig, reference_igos
from lvlm_attribution.methods.registry import get_method
from lvlm_attribution.methods.rollout import (
    RolloutConfig,
    fuse_heads,
    residual_attention,
    rollout,
)
from lvlm_attribution.methods.tmme import TmmeConfig, reference_tmme
from lvlm_attribution.schema import BatchItem, ExplainOptions

from .build import Built, _image, build, count_parameters
from .configs import GPU_ORDER, SCENARIOS, Scenario
from .measure import Meter, Result


class Bench:
    """One built scenario and the measurements on it."""

    def __init__(self, scenario: Scenario, built: Built, meter: Meter) -> None:
        self.s, self.b, self.meter = scenario, built, meter
        self.ex = built.explainer
        self.model = self.ex.model
        self.prompt = self.ex.prepare(built.image, built.question)
        self.ctx = self.context(built.answer_ids)
        self.T = len(built.answer_ids)
        self.L = self.ex.adapter.num_layers

    def context(self, ids: list[int]) -> AttributionContext:
        ctx = AttributionContext(self.model, self.ex.adapter, self.prompt, list(ids))
        _ = ctx.plain_logits  # the capture guard's reference: computed once, outside timings
        return ctx

    def ref_context(self) -> AttributionContext:
        return self.context(self.b.answer_ids[: self.s.ref_tokens])

    def geometry(self) -> dict:
        text = self.model.config.text_config
        return {"seq_len": self.ctx.seq_len, "answer_tokens": self.T,
                "visual_tokens": int(len(self.ctx.visual_positions)),
                "grid": list(self.ctx.grid), "prompt_tokens": self.prompt.prompt_length,
                "decoder_layers": self.L, "heads": int(text.num_attention_heads),
                "kv_heads": int(getattr(text, "num_key_value_heads", text.num_attention_heads)),
                "hidden": int(text.hidden_size), "vocab": int(text.vocab_size),
                "parameters": count_parameters(self.model), "weights": self.b.source,
                "image_size": list(self.b.image.size)}

    def run(self, name: str) -> Result:
        fn = MEASUREMENTS[name]
        return fn(self)

    def timed(self, name, fn, *, warmup=1, repeats=None, scale=1.0, note="", info=None):
        return self.meter.run(name, fn, repeats=self.s.repeats if repeats is None else repeats,
                              warmup=min(warmup, self.s.warmup), scale=scale, note=note,
                              info=info)


# ---- measurements -------------------------------------------------------------------------------
def m_forward(b: Bench) -> Result:
    def fn():
        with torch.no_grad():
            b.model(**b.ctx.inputs, use_cache=False)
    return b.timed("forward", fn, note="plain SDPA forward over [image|prompt|answer], no grad")


def _prompt_inputs(b: Bench) -> dict:
    return {k: v.to(b.ctx.device) for k, v in b.prompt.model_inputs.items()}


def m_generate_hf(b: Bench) -> Result:
    inputs = _prompt_inputs(b)

    def fn():
        with torch.no_grad():
            return b.model.generate(**inputs, max_new_tokens=b.T, min_new_tokens=b.T,
                                    do_sample=False)
    return b.timed("generate.hf", fn, note=f"model.generate, greedy, exactly {b.T} new tokens",
                   info=lambda out: {"new_tokens": int(out.shape[1] - b.prompt.prompt_length)})


def m_generate_engine(b: Bench) -> Result:
    return b.timed("generate.engine", lambda: b.ex.generate_ids(b.prompt, b.T),
                   note="Explainer.generate_ids (min_new_tokens = T)",
                   info=lambda ids: {"new_tokens": len(ids)})


def m_llr(b: Bench) -> Result:
    def fn():
        b.ctx._cache.clear()  # blur baseline + one forward over (image, blurred image)
        return token_llr(b.ctx)
    return b.timed("llr", fn, note="blur baseline (CPU) + one batched forward of 2 images")


def m_dexar_fast(b: Bench) -> Result:
    cfg = DexArConfig()
    return b.timed("dexar.fast", lambda: get_method("dexar").attribute(b.ctx, cfg),
                   note="one forward (detached layer inputs) + one backward, all tokens/layers")


def m_dexar_reference(b: Bench) -> Result:
    ctx = b.ref_context()
    layers = list(range(b.L - min(b.s.ref_layers, b.L), b.L))
    pairs = len(ctx.answer_ids) * len(layers)
    scale = b.T * b.L / pairs
    return b.timed("dexar.reference", lambda: reference_lens_gradients(ctx, layers),
                   warmup=1, repeats=1, scale=scale,
                   note=f"per (token, layer) forward+backward: {pairs} pairs measured, "
                        f"x{scale:g} to T*L")


def official_per_token(ctx: AttributionContext, tokens: range) -> None:
    """The official code's cost profile: per answer token one forward with every layer's full
    attention materialized (eager) and one backward of that token's lens logits."""
    layers = list(range(ctx.adapter.num_layers))
    for t in tokens:
        _, captured = ctx.forward(CaptureSpec(layers=layers, layer_outputs=True), check=False)
        with torch.enable_grad():
            total = sum(ctx.lens_target_logits(captured.layer_outputs[k])[t] for k in layers)
            torch.autograd.grad(total, [captured.probs[k] for k in layers])


def m_dexar_per_token(b: Bench) -> Result:
    n = min(b.s.ref_tokens, b.T)
    return b.timed("dexar.per_token", lambda: official_per_token(b.ctx, range(n)),
                   warmup=1, repeats=1, scale=b.T / n,
                   note=f"official-style: 1 forward+backward per token (cost only); {n} tokens "
                        f"measured, x{b.T / n:g}")


def _glimpse_info(out) -> dict:
    return {"gradient_mode": out.extras.get("gradient_mode")}


def m_glimpse_fast(b: Bench) -> Result:
    cfg = GlimpseConfig(token_chunk=b.s.glimpse_chunk)
    return b.timed("glimpse.fast", lambda: get_method("glimpse").attribute(b.ctx, cfg),
                   note=f"one capture forward, batched per-token backward (chunk "
                        f"{cfg.token_chunk}), fused heads", info=_glimpse_info)


def m_glimpse_replay(b: Bench) -> Result:
    cfg = GlimpseConfig(token_chunk=b.s.replay_chunk, memory_mode="replay")
    return b.timed("glimpse.replay", lambda: get_method("glimpse").attribute(b.ctx, cfg),
                   note=f"layer-by-layer replay (chunk {cfg.token_chunk})", info=_glimpse_info)


def _per_token_reference(b: Bench, name: str, reference: Callable[[AttributionContext], object],
                         what: str) -> Result:
    """A per-token reference timed once on the reference context's tokens, scaled to T."""
    ctx = b.ref_context()
    n = len(ctx.answer_ids)
    return b.timed(name, lambda: reference(ctx), warmup=1, repeats=1, scale=b.T / n,
                   note=f"{what}: {n} tokens measured, x{b.T / n:g}")


def m_glimpse_reference(b: Bench) -> Result:
    return _per_token_reference(
        b, "glimpse.reference", lambda ctx: reference_glimpse(ctx, GlimpseConfig()),
        "reference_glimpse (per token forward+backward, fp64, loops)")


def m_tmme_fast(b: Bench) -> Result:
    cfg = TmmeConfig(token_chunk=b.s.glimpse_chunk)
    return b.timed("tmme.fast", lambda: get_method("tmme").attribute(b.ctx, cfg),
                   note=f"one forward, batched per-token backward (chunk {cfg.token_chunk})")


def m_tmme_reference(b: Bench) -> Result:
    return _per_token_reference(
        b, "tmme.reference", lambda ctx: reference_tmme(ctx, TmmeConfig()),
        "reference_tmme (per token forward+backward, full NxN R)")


def m_rollout_fast(b: Bench) -> Result:
    cfg = RolloutConfig()
    return b.timed("rollout.fast", lambda: get_method("rollout").attribute(b.ctx, cfg),
                   note="forward-only capture, row-vector propagation")


def rollout_full_matrix(ctx: AttributionContext) -> torch.Tensor:
    """Rollout as usually written: the full N x N product, then rows t-1."""
    layers = list(range(ctx.adapter.num_layers))
    captured = forward_only_capture(ctx, CaptureSpec(layers=layers, rows=None))
    attn = torch.stack([fuse_heads(captured.probs[k][0].float()) for k in layers])
    return rollout(residual_attention(attn))[ctx.predict_rows][:, ctx.visual_positions]


def m_rollout_reference(b: Bench) -> Result:
    return b.timed("rollout.reference", lambda: rollout_full_matrix(b.ctx),
                   note="full N x N matrix product over layers")


def m_igos_fast(b: Bench) -> Result:
    cfg = IgosConfig(**{"batch_size": b.s.igos_batch, **b.s.igos_settings})
    token_llr(b.ctx)  # LLR is shared with the engine's per-request LLR: measured as "llr"

    def info(out):
        return {"passes": out.extras.get("passes"),
                "selected": out.extras["token_selection"]["selected"]}
    return b.timed("igos.fast", lambda: get_method("igos").attribute(b.ctx, cfg), info=info,
                   warmup=1 if b.s.size != "7b" else 0,
                   repeats=1 if b.s.size == "7b" else b.s.repeats,
                   note=f"{cfg.iterations} iterations x {2 * cfg.ig_iter} interpolants, "
                        f"{cfg.batch_size} images per forward/backward, LLR cached")


def m_igos_reference(b: Bench) -> Result:
    full = IgosConfig(**b.s.igos_settings)
    cfg = IgosConfig(iterations=1, ig_iter=1)
    selection, _ = select_for_context(b.ctx, cfg.baseline, cfg.alpha, cfg.skip_first, cfg.seed)
    scale = full.iterations * full.ig_iter
    return b.timed("igos.reference",
                   lambda: reference_igos(b.ctx, cfg, positions=selection.selected),
                   warmup=1, repeats=1, scale=scale,
                   note=f"official procedure (1 image per forward+backward): 1 iteration x 1 "
                        f"interpolant pair measured, x{scale} ({full.iterations} x "
                        f"{full.ig_iter} pairs)")


def _batch_items(b: Bench) -> list[BatchItem]:
    size = b.b.image.size
    return [BatchItem(_image(size, seed=i), b.b.question) for i in range(b.s.batch_requests)]


def _batch_options(b: Bench) -> ExplainOptions:
    return ExplainOptions(methods=("dexar",), max_new_tokens=b.T)


def _throughput(n: int):
    def info(out):
        return {"requests": n, "answer_tokens": [len(e.answer_token_ids) for e in out][:4]}
    return info


def m_batch_dexar(b: Bench) -> Result:
    items, options = _batch_items(b), _batch_options(b)
    r = b.timed("batch.dexar", lambda: b.ex.explain_batch(items, options), warmup=1,
                repeats=min(b.s.repeats, 2), info=_throughput(len(items)),
                note=f"explain_batch of {len(items)} requests: answer ({b.T} tokens) + LLR + "
                     "DEX-AR, batched")
    _per_request(r, len(items))
    return r


def m_batch_sequential(b: Bench) -> Result:
    items, options = _batch_items(b), _batch_options(b)

    def fn():
        return [b.ex.explain(it.image, it.question, options=options) for it in items]
    r = b.timed("batch.sequential", fn, warmup=1 if b.s.size != "7b" else 0, repeats=1,
                info=_throughput(len(items)),
                note=f"the same {len(items)} requests through Explainer.explain one by one")
    _per_request(r, len(items))
    return r


def _per_request(r: Result, n: int) -> None:
    if r.median_s:
        r.info["per_request_s"] = r.median_s / n
        r.info["requests_per_s"] = n / r.median_s


MEASUREMENTS: dict[str, Callable[[Bench], Result]] = {
    "forward": m_forward, "generate.hf": m_generate_hf, "generate.engine": m_generate_engine,
    "llr": m_llr, "dexar.fast": m_dexar_fast, "dexar.reference": m_dexar_reference,
    "dexar.per_token": m_dexar_per_token, "glimpse.fast": m_glimpse_fast,
    "glimpse.replay": m_glimpse_replay, "glimpse.reference": m_glimpse_reference,
    "tmme.fast": m_tmme_fast, "tmme.reference": m_tmme_reference,
    "rollout.fast": m_rollout_fast, "rollout.reference": m_rollout_reference,
    "igos.fast": m_igos_fast, "igos.reference": m_igos_reference,
    "batch.dexar": m_batch_dexar, "batch.sequential": m_batch_sequential,
}


# ---- driver -------------------------------------------------------------------------------------
def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
           "cuda": torch.cuda.is_available(), "command": " ".join(sys.argv),
           "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
           "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 1024 ** 3, 1),
                   cuda_version=torch.version.cuda)
    return env


class Report:
    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.data = {"environment": environment(), "scenarios": {}}

    def scenario(self, name: str, entry: dict) -> None:
        self.data["scenarios"][name] = entry
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def run_scenario(scenario: Scenario, report: Report, deadline: float | None,
                 only: set[str] | None = None, verbose: bool = True) -> dict:
    entry: dict = {"scenario": scenario.name, "description": scenario.description,
                   "device": scenario.device, "dtype": scenario.dtype, "status": "building",
                   "results": []}
    report.scenario(scenario.name, entry)
    meter = Meter(scenario.device)
    try:
        built = build(scenario)
        bench = Bench(scenario, built, meter)
        entry.update(build_s=round(built.build_s, 2), geometry=bench.geometry(),
                     status="running")
    except Exception as err:  # noqa: BLE001
        entry.update(status="oom" if "out of memory" in str(err).lower() else "error",
                     error=f"{type(err).__name__}: {str(err)[:400]}")
        report.scenario(scenario.name, entry)
        meter.clean()
        return entry
    if verbose:
        g = entry["geometry"]
        print(f"[bench] {scenario.name}: N={g['seq_len']} T={g['answer_tokens']} "
              f"visual={g['visual_tokens']} L={g['decoder_layers']} "
              f"params={g['parameters'] / 1e6:.1f}M built in {entry['build_s']}s", flush=True)
    forward = None
    for name in scenario.measurements:
        if only and name not in only:
            continue
        if deadline is not None and time.time() > deadline:
            entry["results"].append(Result(name, status="skipped",
                                           note="time budget spent").as_dict())
            continue
        result = bench.run(name)
        if name == "forward" and result.status == "ok":
            forward = result.median_s
        if forward and result.median_s is not None:
            result.ratio_to_forward = round(result.median_s / forward, 2)
        entry["results"].append(result.as_dict())
        report.scenario(scenario.name, entry)
        if verbose:
            print("[bench]   " + _row(scenario.name, result.as_dict()), flush=True)
    entry["status"] = "done"
    report.scenario(scenario.name, entry)
    del bench, built
    meter.clean()
    return entry


# ---- table --------------------------------------------------------------------------------------
HEADER = ("scenario", "measurement", "status", "time", "x fwd", "peak GiB", "+GiB", "note")


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def _row(scenario: str, r: dict) -> str:
    return " | ".join(_cells(scenario, r))


def _cells(scenario: str, r: dict) -> list[str]:
    time_s = _fmt_s(r.get("median_s")) + (" (extrap.)" if r.get("extrapolated") else "")
    note = r.get("note", "")
    info = r.get("info") or {}
    if "gradient_mode" in info:
        note += f"; mode {info['gradient_mode']}"
    if "requests_per_s" in info:
        note += f"; {info['requests_per_s']:.2f} req/s"
    if r.get("error") and r.get("status") != "ok":
        note += f"; {r['error'][:120]}"
    return [scenario, r["name"], r["status"], time_s,
            "-" if r.get("ratio_to_forward") is None else f"{r['ratio_to_forward']:g}",
            "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}",
            "-" if r.get("extra_gib") is None else f"{r['extra_gib']:.1f}", note]


def table(data: dict, markdown: bool = True) -> str:
    lines = []
    env = data.get("environment", {})
    lines.append(f"device: {env.get('gpu') or 'cpu'} ({env.get('cpu_count')} CPUs, "
                 f"{env.get('threads')} torch threads, load average "
                 f"{[round(x, 1) for x in env.get('load_average') or []]}); torch "
                 f"{env.get('torch')}, transformers {env.get('transformers')}")
    for name, entry in data.get("scenarios", {}).items():
        g = entry.get("geometry") or {}
        lines.append("")
        lines.append(f"{name}: {entry.get('description', '')} — N={g.get('seq_len')}, "
                     f"T={g.get('answer_tokens')}, |V|={g.get('visual_tokens')}, "
                     f"L={g.get('decoder_layers')}, {entry.get('device')} {entry.get('dtype')}, "
                     f"status {entry.get('status')}" + (f" ({entry['error']})"
                                                         if entry.get("error") else ""))
        rows = [list(HEADER)] + [_cells(name, r) for r in entry.get("results", [])]
        if markdown:
            lines.append("| " + " | ".join(HEADER[1:]) + " |")
            lines.append("|" + "---|" * (len(HEADER) - 1))
            lines += ["| " + " | ".join(r[1:]) + " |" for r in rows[1:]]
        else:
            lines += ["  ".join(r[1:]) for r in rows]
    return "\n".join(lines)


# ---- CLI ---------------------------------------------------------------------------------------
def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default=None,
                   help=f"comma-separated; 'gpu' = {','.join(GPU_ORDER)}; known: "
                        f"{', '.join(SCENARIOS)}")
    p.add_argument("--json", default=None, help="write results here (rewritten as it goes)")
    p.add_argument("--table", default=None, help="print the table of a saved JSON and exit")
    p.add_argument("--only", default=None, help="comma-separated measurement names")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--layers", type=int, default=None, help="decoder depth override")
    p.add_argument("--vision-layers", type=int, default=None, help="vision depth override")
    p.add_argument("--answer-tokens", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None, help="square test image side (px)")
    p.add_argument("--batch-requests", type=int, default=None, help="B for batch.*")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is steadier on a shared, loaded CPU)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new measurement after this many seconds ('gpu': 540)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.scenario:
        print("give --scenario (or --table)", file=sys.stderr)
        return 2
    names = list(GPU_ORDER) if args.scenario == "gpu" else args.scenario.split(",")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; known: {list(SCENARIOS)}", file=sys.stderr)
        return 2
    budget = args.budget_s if args.budget_s is not None else (
        540.0 if args.scenario == "gpu" else None)
    deadline = time.time() + budget if budget else None
    only = set(args.only.split(",")) if args.only else None
    report = Report(args.json)
    for name in names:
        scenario = SCENARIOS[name].with_overrides(
            repeats=args.repeats, device=args.device, dtype=args.dtype, layers=args.layers,
            vision_layers=args.vision_layers, answer_tokens=args.answer_tokens,
            image_size=(args.image_size, args.image_size) if args.image_size else None,
            batch_requests=args.batch_requests)
        if scenario.device == "cuda" and not torch.cuda.is_available():
            report.scenario(name, {"scenario": name, "status": "skipped",
                                   "error": "no CUDA device", "results": []})
            print(f"[bench] {name}: skipped (no CUDA device; --device cpu runs it here)")
            continue
        run_scenario(scenario, report, deadline, only)
    print()
    print(table(report.data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
