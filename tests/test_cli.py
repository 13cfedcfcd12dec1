"""`lvlm-attribution` as users expect: --version, `methods`, --method-settings, usage errors
(exit 2 with a message, never a traceback) and help on every option."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
from contextlib import contextmanager, redirect_stdout
from importlib import metadata
from pathlib import Path

import pytest

from lvlm_attribution import cli, client
from lvlm_attribution.api.v1 import explain_pb2 as pb
from lvlm_attribution.engine import DTYPES, Explainer
from lvlm_attribution.methods import get_method, list_methods
from lvlm_attribution.world.scenes import KINDS

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "model_store" / "tiny-shapes-llava"
BAD_SETTINGS = ["{bad", "[1, 2]", '{"igos": 3}', '"igos"', "@does-not-exist.json"]


def usage_error(argv: list[str], capsys) -> str:
    """Run the CLI expecting argparse's usage error; its stderr."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# ---- --version -----------------------------------------------------------------------------------
def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"lvlm-attribution {metadata.version('lvlm-attribution')}" in out
    assert f"torch {metadata.version('torch')}" in out
    assert f"transformers {metadata.version('transformers')}" in out


# ---- methods -------------------------------------------------------------------------------------
def registry_settings(name: str) -> list[dataclasses.Field]:
    return list(dataclasses.fields(get_method(name).config))


def test_methods_table_lists_every_method_setting_default_and_limit(capsys, monkeypatch):
    monkeypatch.setattr(Explainer, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    assert cli.main(["methods"]) == 0
    blocks = {b.split(":", 1)[0]: b for b in capsys.readouterr().out.strip().split("\n\n")}
    assert sorted(blocks) == list_methods()
    for name, block in blocks.items():
        spec = get_method(name)
        assert spec.summary in block
        rows = {line.split()[0]: line for line in block.splitlines()[3:]}
        defaults = Explainer.default_settings(name)
        assert sorted(rows) == sorted(f.name for f in registry_settings(name))
        for key, line in rows.items():
            cells = line.split()
            assert cells[-2] == json.dumps(defaults[key]), (name, key)
            limit = spec.limits.get(key)
            assert cells[-1] == ("-" if limit is None else f"{limit:g}"), (name, key)
        assert "COST_LIMITS" not in block


def test_methods_json_matches_the_registry(capsys):
    assert cli.main(["methods", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert sorted(table) == list_methods()
    for name, info in table.items():
        spec = get_method(name)
        assert (info["summary"], info["needs_gradients"], info["needs_perturbation"]) == (
            spec.summary, spec.needs_gradients, spec.needs_perturbation)
        assert list(info["settings"]) == [f.name for f in registry_settings(name)]
        defaults = Explainer.default_settings(name)
        for key, setting in info["settings"].items():
            assert setting["default"] == defaults[key]
            assert setting["limit"] == spec.limits.get(key)
            assert setting["type"] and "ClassVar" not in setting["type"]
    assert table["igos"]["settings"]["iterations"]["type"] == "int"


# ---- choices and validated lists ---------------------------------------------------------------
def test_dtype_choices_are_the_engines():
    assert set(cli.DTYPE_CHOICES) == set(DTYPES)


def test_bad_scene_kind_is_a_usage_error(capsys):
    err = usage_error(["scene", "--kind", "colour"], capsys)
    assert "invalid choice" in err and all(kind in err for kind in KINDS)


def test_bad_dtype_is_a_usage_error(capsys):
    err = usage_error(["explain", "--image", "x.png", "--question", "q", "--dtype", "fp8"], capsys)
    assert "invalid choice" in err


@pytest.mark.parametrize("command", ["explain", "grounding-eval"])
def test_unknown_method_is_a_usage_error(command, capsys):
    argv = [command, "--methods", "glimpse,gradcm"]
    if command == "explain":
        argv += ["--image", "x.png", "--question", "q"]
    err = usage_error(argv, capsys)
    assert "gradcm" in err and "gradcam" in err  # names the bad one and the available ones


def test_audit_unknown_local_method_is_refused_before_any_work(tmp_path, capsys):
    rc = cli.main(["audit", "--input", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o"),
                   "--methods", "dexar,nope"])
    assert rc == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---- --method-settings ---------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["explain", "call", "evaluate"])
@pytest.mark.parametrize("value", BAD_SETTINGS)
def test_bad_method_settings_is_a_usage_error(command, value, capsys):
    argv = [command, "--method-settings", value]
    if command != "evaluate":
        argv += ["--image", "x.png", "--question", "q"]
    err = usage_error(argv, capsys)
    assert "argument --method-settings" in err
    assert "cannot read" in err if value.startswith("@") else '{"igos": {"iterations": 3}}' in err


@pytest.mark.parametrize("command", ["explain", "call", "evaluate"])
def test_method_settings_inline_or_from_a_file(command, tmp_path):
    settings = {"igos": {"iterations": 3}, "glimpse": {"tau": 0.25}}
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(settings))
    parser = cli.build_parser()
    base = [command] if command == "evaluate" else [command, "--image", "x", "--question", "q"]
    for value in (json.dumps(settings), f"@{path}"):
        assert parser.parse_args(base + ["--method-settings", value]).method_settings == settings
    assert parser.parse_args(base).method_settings is None


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory) -> dict:
    """`lvlm-attribution scene`'s printed record of the PNG it wrote."""
    out = tmp_path_factory.mktemp("scene") / "scene.png"
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli.main(["scene", "--seed", "3", "--kind", "color", "--out", str(out)]) == 0
    assert out.is_file()
    return json.loads(buf.getvalue())


def explain_argv(scene: dict, settings: dict) -> list[str]:
    return ["explain", "--model", str(EMBEDDED), "--image", scene["image"], "--question",
            scene["question"], "--methods", "igos", "--method-settings", json.dumps(settings),
            "--json"]


def test_explain_method_settings_reach_the_engine(scene_file, capsys):
    assert cli.main(explain_argv(scene_file, {"igos": {"iterations": 1}})) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["settings"]["igos"]["iterations"] == 1
    assert result["settings"]["igos"]["ig_iter"] == Explainer.default_settings("igos")["ig_iter"]


def test_explain_out_of_limit_setting_is_a_clean_error(scene_file, capsys):
    limit = get_method("igos").limits["iterations"]
    assert cli.main(explain_argv(scene_file, {"igos": {"iterations": limit + 1}})) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "igos.iterations" in captured.err and f"limit of {limit:g}" in captured.err
    assert "Traceback" not in captured.err


def test_call_sends_method_settings(tmp_path, monkeypatch, capsys):
    sent: list[pb.ExplainRequest] = []

    class FakeClient:
        def explain(self, request: pb.ExplainRequest) -> pb.ExplainResponse:
            sent.append(request)
            return pb.ExplainResponse(answer="ok")

    @contextmanager
    def fake_connect(url, model):
        yield FakeClient()

    monkeypatch.setattr(client, "connect", fake_connect)
    image = tmp_path / "x.png"
    image.write_bytes(b"not looked at by the client")
    assert cli.main(["call", "--image", str(image), "--question", "q", "--json",
                     "--method-settings", '{"igos": {"iterations": 3}}']) == 0
    assert json.loads(capsys.readouterr().out)["answer"] == "ok"
    assert dict(sent[0].method_settings["igos"]) == {"iterations": 3}


# ---- help ----------------------------------------------------------------------------------------
def test_every_option_of_every_subcommand_has_help():
    parser = cli.build_parser()
    commands = subparsers(parser)
    assert {"methods", "explain", "call", "scene", "audit", "evaluate"} <= set(commands)
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}"
               for name, sub in [("", parser), *commands.items()]
               for a in sub._actions
               if not isinstance(a, argparse._SubParsersAction)
               and (not a.help or a.help == argparse.SUPPRESS)]
    assert not missing, missing
    for name, sub in commands.items():
        assert sub.format_help(), name  # every help string formats (no stray %)
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {choice.dest: choice.help for choice in action._choices_actions}
    assert all(summaries.get(name) for name in commands), summaries
