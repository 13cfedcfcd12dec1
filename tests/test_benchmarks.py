"""The benchmark cannot rot: the CPU smoke scenario runs every measurement (the code paths the
7B GPU run takes, at tiny sizes), the reporting handles OOM/errors/budgets, the typed-in 7B
configs build (on the meta device) with the public parameter counts and give the intended
sequence lengths; GLIMPSE's replay memory mode equals the full path."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

from benchmarks import run as bench_run
from benchmarks.build import (
    count_parameters,
    instantiate,
    llava_7b_config,
    llava_processor,
    qwen_7b_config,
    qwen_processor,
)
from benchmarks.configs import ALL, GPU_ORDER, SCENARIOS
from benchmarks.measure import Meter, Result
from lvlm_attribution.context import AttributionContext
from lvlm_attribution.engine import Explainer
from lvlm_attribution.methods.registry import get_method
from lvlm_attribution.models.tiny import build_tiny


def test_smoke_scenario_runs_every_measurement(tmp_path, capsys):
    out = tmp_path / "smoke.json"
    threads = torch.get_num_threads()
    try:  # one thread: steady on a shared CPU (see docs/performance.md)
        assert bench_run.main(["--scenario", "smoke", "--threads", "1", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    entry = data["scenarios"]["smoke"]
    assert entry["status"] == "done"
    results = {r["name"]: r for r in entry["results"]}
    assert set(results) == set(ALL)
    bad = {k: r["error"] for k, r in results.items() if r["status"] != "ok"}
    assert not bad, bad
    assert results["forward"]["ratio_to_forward"] == 1
    for r in results.values():
        assert r["median_s"] > 0 and r["peak_gib"] is None  # no CUDA: memory is a no-op
    assert results["glimpse.replay"]["info"]["gradient_mode"].startswith("replay")
    assert results["dexar.reference"]["extrapolated"] and results["dexar.reference"]["scale"] > 1
    assert results["batch.dexar"]["info"]["requests"] == 2
    assert entry["geometry"]["answer_tokens"] == 4 and entry["geometry"]["visual_tokens"] == 16
    printed = capsys.readouterr().out
    assert "| glimpse.replay | ok |" in printed
    assert "glimpse.fast" in bench_run.table(data)


def test_smoke_qwen_scenario(tmp_path):
    out = tmp_path / "q.json"
    threads = torch.get_num_threads()
    try:
        assert bench_run.main(["--scenario", "smoke-qwen", "--threads", "1", "--json", str(out),
                               "--only", "forward,dexar.fast,glimpse.replay,batch.dexar"]) == 0
    finally:
        torch.set_num_threads(threads)
    entry = json.loads(out.read_text())["scenarios"]["smoke-qwen"]
    bad = {r["name"]: r["error"] for r in entry["results"] if r["status"] != "ok"}
    assert entry["status"] == "done" and not bad, bad


def test_gpu_scenarios_are_skipped_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"
    assert bench_run.main(["--scenario", "gpu", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert list(data["scenarios"]) == list(GPU_ORDER)
    assert all(e["status"] == "skipped" for e in data["scenarios"].values())


def test_meter_records_oom_errors_and_budget():
    meter = Meter("cpu")

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    def broken():
        raise ValueError("boom")

    assert meter.run("x", oom).status == "oom"
    err = meter.run("y", broken)
    assert err.status == "error" and "boom" in err.error
    ok = meter.run("z", lambda: 1, repeats=3, warmup=1, scale=5.0)
    assert ok.status == "ok" and len(ok.times_s) == 3 and ok.extrapolated
    assert ok.median_s == pytest.approx(sorted(ok.times_s)[1] * 5.0)
    assert "oom" in bench_run._row("s", Result("x", status="oom", error="OOM").as_dict())


def test_budget_skips_remaining_measurements(tmp_path):
    report = bench_run.Report(str(tmp_path / "b.json"))
    scenario = SCENARIOS["smoke"].with_overrides(measurements=("forward", "dexar.fast"))
    entry = bench_run.run_scenario(scenario, report, deadline=0.0, verbose=False)
    assert [r["status"] for r in entry["results"]] == ["skipped", "skipped"]


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_7b_configs_have_the_public_parameter_counts(family):
    """Built on the meta device (no memory): the typed-in configs are the real shapes."""
    if family == "llava":
        processor = llava_processor(336)
        model = instantiate(LlavaForConditionalGeneration, llava_7b_config(processor.tokenizer),
                            "meta", torch.bfloat16)
        assert count_parameters(model) == 7_063_427_072  # llava-hf/llava-1.5-7b-hf
    else:
        processor = qwen_processor(1344)
        model = instantiate(Qwen2_5_VLForConditionalGeneration,
                            qwen_7b_config(processor.tokenizer), "meta", torch.bfloat16)
        assert count_parameters(model) == 8_292_166_656  # Qwen/Qwen2.5-VL-7B-Instruct
    assert next(model.parameters()).dtype == torch.bfloat16
    # every id a random model can generate decodes (the hub-free vocabulary is padded)
    assert len(processor.tokenizer) == model.config.text_config.vocab_size


@pytest.mark.parametrize(("side", "visual"), [(336, 576), (672, 2304), (966, 4761)])
def test_llava_processor_token_counts(side, visual):
    processor = llava_processor(side)
    image = Image.new("RGB", (side, side))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what"}]}],
        add_generation_prompt=True)
    ids = processor(images=image, text=text, return_tensors="pt")["input_ids"][0]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((ids == image_id).sum()) == visual


def test_qwen_processor_token_count_at_1344px():
    processor = qwen_processor(1344)
    out = processor.image_processor(images=Image.new("RGB", (1344, 1344)), return_tensors="pt")
    t, h, w = out["image_grid_thw"][0].tolist()
    assert (t, h // 2 * w // 2) == (1, 2304)


def test_scenario_sequence_lengths():
    """N for the 7B scenarios (no model needed: visual tokens + template + question + answer)."""
    from benchmarks.build import QUESTION_WORDS, _words
    processor = llava_processor(336)
    scenario = SCENARIOS["llava7b-336"]
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _words(
            QUESTION_WORDS, scenario.prompt_words)}]}], add_generation_prompt=True)
    ids = processor(images=Image.new("RGB", (336, 336)), text=text,
                    return_tensors="pt")["input_ids"]
    n = ids.shape[1] + scenario.answer_tokens
    assert 640 <= n <= 660  # DESIGN §4 measured at N = 647


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "paligemma"])
def test_glimpse_replay_equals_full_path(family):
    """memory_mode="replay" (layer-by-layer, one N x N graph at a time) gives the full path's
    GLIMPSE output: maps, token weights, alpha, head weights (fp32)."""
    model, processor = build_tiny(family)
    explainer = Explainer(model, processor, family, "random")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8))
    ids = explainer.tokenizer.convert_tokens_to_ids(["red", "circle", "top", "left", "of"])
    prompt = explainer.prepare(image, "what color is the circle")
    ctx = AttributionContext(model, explainer.adapter, prompt, ids)
    for settings in ({"token_chunk": 2}, {"token_chunk": 3, "last_fraction": 0.5,
                                          "propagation": "literal"}):
        spec = get_method("glimpse")
        outs = [spec.attribute(ctx, spec.make_config({**settings, "memory_mode": mode}))
                for mode in ("full", "replay")]
        full, replay = outs
        assert replay.extras["gradient_mode"].startswith("replay")
        for a, b in ((full.visual_map, replay.visual_map),
                     (full.per_token_maps, replay.per_token_maps),
                     (full.prompt_saliency, replay.prompt_saliency),
                     (full.extras["alpha"], replay.extras["alpha"]),
                     (full.extras["head_weights"], replay.extras["head_weights"])):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
        for key in full.token_weights:
            np.testing.assert_allclose(full.token_weights[key], replay.token_weights[key],
                                       atol=1e-5, rtol=1e-5)
        assert {k: v for k, v in full.settings.items() if k != "memory_mode"} == \
            {k: v for k, v in replay.settings.items() if k != "memory_mode"}


def test_scenarios_are_consistent():
    for scenario in SCENARIOS.values():
        assert set(scenario.measurements) <= set(bench_run.MEASUREMENTS), scenario.name
        assert dataclasses.replace(scenario).name == scenario.name
    assert set(ALL) == set(bench_run.MEASUREMENTS)


def test_glimpse_replay_loop_fallback_is_exact(monkeypatch):
    """If the vectorized backward fails (no batching rule, out of memory), replay redoes the
    layer and loops over tokens: same result."""
    import lvlm_attribution.methods.glimpse as glimpse

    model, processor = build_tiny("llava")
    explainer = Explainer(model, processor, "llava", "random")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), np.uint8))
    ids = explainer.tokenizer.convert_tokens_to_ids(["red", "circle", "top"])
    ctx = AttributionContext(model, explainer.adapter,
                             explainer.prepare(image, "what color is the circle"), ids)
    full = glimpse.relevance_rows(ctx, glimpse.GlimpseConfig(token_chunk=2))
    grad = torch.autograd.grad

    def no_batched(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("CUDA out of memory (simulated)")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batched)
    replay = glimpse.relevance_rows(ctx, glimpse.GlimpseConfig(token_chunk=2,
                                                               memory_mode="replay"))
    assert replay[4] == "replay-loop"
    for a, b in zip(full[:3], replay[:3], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
