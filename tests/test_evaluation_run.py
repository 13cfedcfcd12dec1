"""`evaluate` harness: output structure and resumability (random-weight model, 3 scenes)."""

from __future__ import annotations

import json
import math

import pytest

from lvlm_attribution.evaluation import run as run_mod
from lvlm_attribution.evaluation.run import (
    METRICS,
    REFERENCE_MAPS,
    EvalConfig,
    explain_rounds,
    format_report,
    parse_methods,
    report_from_file,
    run_evaluation,
)


def test_parse_methods_and_rounds():
    v = parse_methods("glimpse,dexar,glimpse:depth_prior=false:last_fraction=0.5,"
                      "dexar:key_aggregation=mean", {"glimpse": {"tau": 0.25}})
    assert [x.label for x in v] == ["glimpse", "dexar", "glimpse:depth_prior=false:"
                                    "last_fraction=0.5", "dexar:key_aggregation=mean"]
    assert v[0].settings == {"tau": 0.25}
    assert v[2].settings == {"tau": 0.25, "depth_prior": False, "last_fraction": 0.5}
    rounds = explain_rounds(v)
    assert [[x.label for x in r] for r in rounds] == [["glimpse", "dexar"],
                                                     [v[2].label, v[3].label]]
    for bad in ("nosuch", "glimpse:nosuch=1", "dexar:key_aggregation=median", "glimpse:x",
                "dexar,dexar", "uniform"):
        with pytest.raises((KeyError, ValueError)):
            parse_methods(bad)
    with pytest.raises(ValueError):
        parse_methods("dexar", {"glimpse": {"tau": 1.0}})


def test_structure(random_llava_explainer, tmp_path):
    cfg = EvalConfig(scenes=3, seed=5, methods="dexar,dexar:token_filter=false", steps=4,
                     ppl_points=3, kinds=("color", "existence"))
    report = run_evaluation(random_llava_explainer, cfg, tmp_path / "e.jsonl", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert lines[0]["type"] == "header" and len(lines) == 4
    scenes = lines[1:]
    assert [s["kind"] for s in scenes] == ["color", "existence", "color"]
    labels = ["dexar", "dexar:token_filter=false", *REFERENCE_MAPS]
    assert report["labels"] == labels
    for s in scenes:
        assert set(s["metrics"]) == set(labels)
        for label in labels:
            m = s["metrics"][label]
            assert {"epg", "nss", "deletion", "insertion", "ppl_pos", "ppl_neg"} <= set(m)
            if s["mask_area"] == 0:  # absent-object question: localisation undefined
                assert m["epg"] is None
            else:
                assert 0.0 <= m["epg"] <= 1.0
        assert "token_snr" in s["metrics"]["dexar"]
        assert "token_snr" not in s["metrics"]["uniform"]
        uni = s["metrics"]["uniform"]
        if s["mask_area"] > 0:
            assert uni["epg"] == pytest.approx(s["mask_area"])
    summary = report["summary"]
    assert set(summary) == {"all", "color", "existence"}
    assert summary["all"]["scenes"] == 3 and summary["color"]["scenes"] == 2
    row = summary["all"]["maps"]["dexar"]
    assert set(row) - {"scenes"} <= set(METRICS)
    assert {"mean", "low", "high", "median", "median_low", "median_high", "n", "n_nan",
            "n_inf"} == set(row["epg"])
    assert set(report["acceptance"]) == {"dexar"}
    assert report["scenes_done"] == 3 and report["scenes_resumed"] == 0
    table = format_report(report)
    assert "| dexar:token_filter=false |" in table and "epg ↑" in table
    assert "medians [95% bootstrap CI]" in table and "deletion ↓" in table
    ok = "yes" if report["acceptance"]["dexar"]["epg_3x_area"] else "**no**"
    assert f"| epg_3x_area | {ok} |" in table and "| mean EPG / mean mask area |" in table
    json.dumps(report)  # JSON-safe (no NaN / inf objects)
    again = report_from_file(tmp_path / "e.jsonl")  # --report-only: no model needed
    assert again["summary"] == report["summary"] and again["scenes_done"] == 3


def test_resume_skips_done_scenes(random_llava_explainer, tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    cfg = EvalConfig(scenes=3, seed=6, methods="dexar", perturbation=False)
    calls = []
    real = run_mod.evaluate_scene

    def interrupted(explainer, sample, index, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(index)
        return real(explainer, sample, index, *args)

    monkeypatch.setattr(run_mod, "evaluate_scene", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(random_llava_explainer, cfg, out, progress=False)
    assert calls == [0, 1]
    with out.open("a") as f:  # a torn line, as if killed mid-write
        f.write('{"type": "scene", "ind')
    calls.clear()
    monkeypatch.setattr(run_mod, "evaluate_scene",
                        lambda ex, s, i, *a: calls.append(i) or real(ex, s, i, *a))
    report = run_evaluation(random_llava_explainer, cfg, out, progress=False)
    assert calls == [2]
    assert report["scenes_done"] == 3 and report["scenes_resumed"] == 2
    indices = [json.loads(x).get("index") for x in out.read_text().splitlines()[1:]]
    assert indices == [0, 1, 2]
    assert "deletion" not in report["summary"]["all"]["maps"]["dexar"]
    # other settings -> refused, not silently mixed
    with pytest.raises(ValueError):
        run_evaluation(random_llava_explainer, EvalConfig(scenes=3, seed=7, methods="dexar",
                                                          perturbation=False), out,
                       progress=False)
    assert not math.isnan(report["summary"]["all"]["mask_area"]["mean"])


def test_shards_cover_the_plan_and_merge(random_llava_explainer, tmp_path):
    """Two shards (one per core) run disjoint scenes; --report-only merges their files, counting
    a scene present in both once; files from other settings are refused."""
    base = dict(scenes=4, seed=8, methods="dexar", perturbation=False)
    outs = [tmp_path / f"s{k}.jsonl" for k in range(2)]
    for k, out in enumerate(outs):
        run_evaluation(random_llava_explainer, EvalConfig(**base, shard=(k, 2)), out,
                       progress=False)
    indices = [[json.loads(x)["index"] for x in o.read_text().splitlines()[1:]] for o in outs]
    assert indices == [[0, 2], [1, 3]]
    with outs[1].open("a") as f:  # a duplicate of shard 0's scene 0
        f.write(outs[0].read_text().splitlines()[1] + "\n")
    merged = report_from_file(outs)
    assert merged["scenes_done"] == 4 and merged["summary"]["all"]["scenes"] == 4
    whole = run_evaluation(random_llava_explainer, EvalConfig(**base), None, progress=False)
    assert merged["summary"] == whole["summary"]
    other = tmp_path / "other.jsonl"
    run_evaluation(random_llava_explainer, EvalConfig(**{**base, "scenes": 1, "seed": 9}), other,
                   progress=False)
    with pytest.raises(ValueError):
        report_from_file([outs[0], other])


def test_cli_shard_and_report_only(tmp_path, capsys):
    from lvlm_attribution.cli import build_parser, main

    parser = build_parser()
    assert parser.parse_args(["evaluate", "--shard", "1/2"]).shard == (1, 2)
    assert parser.parse_args(["evaluate"]).shard == (0, 1)
    for bad in ("2/2", "1", "a/b", "-1/2"):
        with pytest.raises(SystemExit):
            parser.parse_args(["evaluate", "--shard", bad])
    assert "K/N" in capsys.readouterr().err
    # --report-only over two files from different runs is refused with a message, not a trace
    for name, seed in (("a", 1), ("b", 2)):
        header = {"type": "header", "config": {"seed": seed, "methods": "dexar"}}
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(header) + "\n")
    out = f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}"
    assert main(["evaluate", "--report-only", "--out", out]) == 2
    assert "other settings" in capsys.readouterr().err
