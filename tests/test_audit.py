"""Audit tooling (lvlm_attribution/audit): bulk explanations, pictures, reports, summary."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import threading
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lvlm_attribution.audit import LocalBackend, ServiceBackend, auroc, read_jsonl, run_audit
from lvlm_attribution.audit.runner import item_dir_name
from lvlm_attribution.audit.sample import build_sample
from lvlm_attribution.world.scenes import generate

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("glimpse", "dexar")
NASTY_ID = 'x<img src=x onerror="alert(1)">&'
NASTY_QUESTION = "what color is the <script>alert('q')</script> square & co ?"


def _write_jsonl(folder: Path) -> Path:
    """4 good items (2 correct, 2 corrupted; one with HTML in its id and question), one missing
    image, one unreadable image."""
    (folder / "img").mkdir(parents=True)
    lines = []
    for i, (seed, wrong) in enumerate([(3, None), (4, "red"), (5, None), (6, "blue")]):
        sample = generate(seed, "color")
        Image.fromarray(sample.image).save(folder / "img" / f"{i}.png")
        answer = sample.answer if wrong is None else " ".join(sample.answer.split()[:-1]
                                                               + [wrong])
        lines.append({"id": NASTY_ID if i == 2 else f"item-{i}",
                      "image": f"img/{i}.png" if i != 3 else str(folder / "img" / f"{i}.png"),
                      "question": NASTY_QUESTION if i == 2 else sample.question,
                      "answer": answer, "truth": "correct" if wrong is None else "corrupted"})
    (folder / "img" / "broken.png").write_bytes(b"this is not an image")
    lines.append({"id": "missing", "image": "img/nope.png", "question": "what ?", "answer": "a"})
    lines.append({"id": "broken", "image": "img/broken.png", "question": "what ?", "answer": "a"})
    path = folder / "flagged.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "not json\n")
    return path


class CountingBackend:
    def __init__(self, inner) -> None:
        self.inner, self.calls, self.name = inner, 0, inner.name
        self.lock = threading.Lock()

    def explain(self, item, image, data):
        with self.lock:
            self.calls += 1
        return self.inner.explain(item, image, data)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def audited(random_llava_explainer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("audit")
    jsonl = _write_jsonl(folder)
    backend = CountingBackend(LocalBackend(random_llava_explainer, METHODS))
    summary = run_audit(jsonl, folder / "out", backend, concurrency=2, progress=False)
    return folder, jsonl, folder / "out", summary, backend


def test_batch_outputs_and_error_isolation(audited):
    _, _, out, summary, backend = audited
    assert backend.calls == 4
    assert (summary["n_items"], summary["n_ok"], summary["n_errors"]) == (7, 4, 3)
    errors = {r["id"]: r for r in summary["items"] if r["status"] == "error"}
    assert errors["missing"]["error_kind"] == "image_not_found"
    assert "nope.png" in errors["missing"]["error"]
    assert errors["broken"]["error_kind"] == "image_unreadable"
    assert errors["line-7"]["error_kind"] == "bad_line"
    done = [r for r in summary["items"] if r["status"] == "ok"]
    assert len(done) == 4
    scores = [r["score"] for r in done]
    assert scores == sorted(scores), "index and summary are sorted ascending by score"
    assert summary["items"][-3:] == sorted(errors.values(), key=lambda r: r["id"])
    for r in done:
        folder = out / "items" / item_dir_name(r["id"])
        for name in ("overlay.png", "report.html", "record.json"):
            assert (folder / name).is_file(), name
        assert set(r["timings"]) == set(METHODS)
        assert r["score_source"] == summary["score_source"]
    with Image.open(out / "items" / "item-0" / "overlay.png") as pic:
        assert pic.mode == "RGB" and pic.size[0] > 3 * pic.size[1] // 2  # 3 panels + scale
        assert len(np.unique(np.asarray(pic).reshape(-1, 3), axis=0)) > 100
    # summary.json / summary.csv hold the same rows; AUROC from the truth field
    stored = json.loads((out / "summary.json").read_text())
    assert [r["id"] for r in stored["items"]] == [r["id"] for r in summary["items"]]
    assert stored["auroc_n"] == 4 and 0.0 <= stored["auroc"] <= 1.0
    assert stored["score_source"].startswith(("grounding:", "proxy:"))
    with (out / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["id"] for r in rows] == [r["id"] for r in summary["items"]]
    assert {"time_glimpse_s", "time_dexar_s", "score", "flagged_tokens", "error"} <= set(rows[0])
    assert rows[-1]["error_kind"] and rows[0]["score"]


def test_html_escapes_user_text_and_is_self_contained(audited):
    _, _, out, _, _ = audited
    folder = out / "items" / item_dir_name(NASTY_ID)
    assert folder.parent == out / "items" and "<" not in folder.name
    for page in (folder / "report.html", out / "index.html"):
        text = page.read_text()
        assert "<script>alert" not in text and "<img src=x" not in text
        assert "&lt;script&gt;alert(&#x27;q&#x27;)&lt;/script&gt;" in text
        assert "x&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;" in text
        assert "http://" not in text and "https://" not in text  # no network resources
    report = (folder / "report.html").read_text()
    assert "data:image/png;base64," in report and "<script" not in report  # no JS needed
    for needle in ("Per-token values", "LLR", "Settings used", "random-llava", "Prompt saliency"):
        assert needle in report
    index = (out / "index.html").read_text()
    assert 'src="items/item-0/overlay.png"' in index  # relative file inside DIR


def test_service_backend_returns_the_same_record(random_llava_explainer, audited):
    """--url path end to end over real HTTP with the typed REST client: a stand-in server that
    answers with the service's own response mapping gives the same record as the local backend,
    and a 400 becomes a per-item error carrying the server's message."""
    from google.protobuf import json_format

    from lvlm_attribution.api.v1 import explain_pb2 as pb
    from lvlm_attribution.service.config import ServiceConfig
    from lvlm_attribution.service.response import full_response
    from lvlm_attribution.service.validation import validate

    folder, jsonl, out_local, _, _ = audited
    accepted = json.loads((out_local / "items" / "item-0" / "record.json").read_text())
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            req = json_format.Parse(body, pb.ExplainRequest())
            if req.answer != accepted["item"]["answer"] or req.request_id != "item-0":
                return self._send(400, {"code": 400, "type": "InvalidRequest",
                                        "message": "answer: refused by the test server"})
            job = validate(req, ServiceConfig(), random_llava_explainer.available_methods())
            with lock:
                expl = random_llava_explainer.explain(job.image, job.question,
                                                      answer=job.answer, options=job.options)
            self._send(200, json_format.MessageToDict(full_response(job, expl, audit=True)))

        def _send(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        summary = run_audit(jsonl, folder / "out-service", ServiceBackend(url, METHODS),
                            concurrency=3, progress=False)
    finally:
        server.shutdown()
    assert summary["n_ok"] == 1 and summary["n_errors"] == 6
    refused = [r for r in summary["items"] if r["error_kind"] == "service"]
    assert len(refused) == 3
    assert refused[0]["error"] == "HTTP 400: answer: refused by the test server"
    remote = json.loads((folder / "out-service" / "items" / "item-0" / "record.json")
                        .read_text())["record"]
    local = accepted["record"]
    assert remote["backend"] == url and local["backend"] == "local"
    assert remote["answer"] == local["answer"] and remote["model"] == local["model"]
    assert remote["visualBox"] == local["visualBox"] == [0.0, 0.0, 64.0, 64.0]
    for a, b in zip(remote["tokens"], local["tokens"], strict=True):
        assert a["text"] == b["text"] and a["grounded"] == b["grounded"]
        assert a["probability"] == pytest.approx(b["probability"], rel=1e-5, abs=1e-6)
        assert a["llr"] == pytest.approx(b["llr"], rel=1e-4, abs=1e-5)
        assert a["weights"].keys() == b["weights"].keys()
    assert list(remote["maps"]) == list(METHODS)
    for name in METHODS:  # f16 on the wire
        np.testing.assert_allclose(remote["maps"][name], local["maps"][name], rtol=2e-3,
                                   atol=1e-4)
    assert remote["promptSaliency"]["tokens"] == local["promptSaliency"]["tokens"]
    assert remote["settings"].keys() == local["settings"].keys()
    assert remote["score"] == pytest.approx(local["score"], rel=1e-4, abs=1e-6)
    assert remote["scoreSource"] == local["scoreSource"]


def test_resume_skips_complete_items(audited, random_llava_explainer, tmp_path):
    folder, jsonl, out, first, _ = audited
    again = CountingBackend(LocalBackend(random_llava_explainer, METHODS))
    summary = run_audit(jsonl, out, again, concurrency=1, progress=False)
    assert again.calls == 0 and summary["n_resumed"] == 4 and summary["n_errors"] == 3
    assert [r["id"] for r in summary["items"]] == [r["id"] for r in first["items"]]
    # an item whose outputs are incomplete (interrupted before record.json) is redone
    (out / "items" / "item-1" / "record.json").unlink()
    leftover = out / "items" / "item-1" / ".record.json.x.tmp"
    leftover.write_text("{")  # a torn temporary file is ignored
    summary = run_audit(jsonl, out, again, concurrency=1, progress=False)
    assert again.calls == 1 and summary["n_resumed"] == 3 and summary["n_ok"] == 4
    # other methods than the stored ones: explained again, not resumed (on a copy)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    other = CountingBackend(LocalBackend(random_llava_explainer, ("dexar",)))
    other.methods = ("dexar",)
    summary = run_audit(jsonl, copy, other, concurrency=2, progress=False)
    assert other.calls == 4 and summary["n_resumed"] == 0 and summary["methods"] == ["dexar"]


def test_auroc_and_sample_builder(tmp_path):
    assert auroc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auroc([0.1], [0.9]) == 0.0
    assert auroc([0.5], [0.5]) == 0.5
    assert auroc([], [0.5]) is None
    path = build_sample(tmp_path, scenes=25, seed=3)
    items, errors = read_jsonl(path)
    assert not errors and len(items) == 50
    assert {i.truth for i in items} == {"correct", "corrupted"}
    for good, bad in zip(items[::2], items[1::2], strict=True):
        assert good.image_path == bad.image_path and good.question == bad.question
        assert good.answer != bad.answer and len(good.answer.split()) == len(bad.answer.split())
        assert bad.extra["corrupted_words"]
    assert items[0].image_path.is_file()


def test_cli_registers_audit_commands():
    from lvlm_attribution.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["audit", "--input", "f.jsonl", "--out", "d", "--url",
                              "http://h:8080", "--concurrency", "4"])
    assert (args.url, args.concurrency, args.methods) == ("http://h:8080", 4, "glimpse,dexar")
    args = parser.parse_args(["audit-sample", "--out", "d", "--scenes", "30", "--seed", "1"])
    assert (args.scenes, args.seed) == (30, 1)


# ---- a real browser ------------------------------------------------------------------------------
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def chromium() -> str:
    """deploy/scripts/ensure_chromium.sh installs Chromium when missing and apt-get is there."""
    script = ROOT / "deploy" / "scripts" / "ensure_chromium.sh"
    try:
        done = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                              timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("ensure_chromium.sh: installing chromium took longer than 15 minutes")
    if done.returncode != 0:
        pytest.skip(f"no headless chromium: {done.stderr.strip() or 'ensure_chromium.sh failed'}")
    return done.stdout.strip().splitlines()[-1]


def _render(browser: str, page: Path, shot: Path, tmp: Path, size: str) -> subprocess.Popen:
    """One Chromium run: the screenshot and the DOM after parsing (stdout)."""
    return subprocess.Popen([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp}",
                             f"--screenshot={shot}", f"--window-size={size}", "--dump-dom",
                             page.as_uri()], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


class _DomText(HTMLParser):
    """The text of a dumped DOM, the answer-token spans in order, and the tags seen (an <img>
    only as a thumbnail)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.answer_tokens: list[str] = []
        self.tags: set[str] = set()
        self._in_token = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add("thumb" if tag == "img" and attrs.get("class") == "thumb" else tag)
        self._in_token = tag == "span" and attrs.get("data-kind") == "answer"

    def handle_endtag(self, tag):
        self._in_token = False

    def handle_data(self, data):
        self.parts.append(data)
        if self._in_token:
            self.answer_tokens.append(data)

    @property
    def text(self) -> str:
        return "".join(self.parts)


def _not_blank(shot: Path) -> None:
    with Image.open(shot) as pic:
        pixels = np.asarray(pic.convert("RGB"), dtype=np.float32)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert pixels.std() > 10.0, "screenshot is (nearly) blank"
    assert len(colours) > 50, f"only {len(colours)} distinct colours"


def test_reports_render_in_headless_chromium(audited, chromium, tmp_path):
    _, _, out, summary, _ = audited
    stored = json.loads((out / "items" / "item-0" / "record.json").read_text())
    runs = {}
    for name, page, size in (("item", out / "items" / "item-0" / "report.html", "1200,1400"),
                             ("index", out / "index.html", "1400,900")):
        runs[name] = _render(chromium, page, tmp_path / f"{name}.png", tmp_path / f"ud-{name}",
                             size)
    doms = {}
    for name, proc in runs.items():
        try:
            doms[name], _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"chromium did not render the {name} page in 240 s")
        _not_blank(tmp_path / f"{name}.png")
    item, index = _DomText(), _DomText()
    item.feed(doms["item"])
    index.feed(doms["index"])
    tokens = [t["text"] for t in stored["record"]["tokens"]]
    assert item.answer_tokens[:len(tokens)] == tokens  # the first coloured row, in order
    assert "Per-token values" in item.text and "not supported" in item.text
    for row in summary["items"]:
        assert row["id"] in index.text  # escaped user text comes back as text, not markup
    assert "script" not in item.tags and "img" not in index.tags - {"thumb"}
    shutil.rmtree(tmp_path / "ud-item", ignore_errors=True)


def test_busy_service_is_retried_other_refusals_are_not():
    """TorchServe with job tickets answers 503 at once when no worker is free: retried with
    backoff; a 400 is the item's error at once."""
    from lvlm_attribution.client import ServiceCallError

    class Busy:
        def __init__(self, failures):
            self.failures, self.calls = list(failures), 0

        def explain(self, request):
            self.calls += 1
            if self.failures:
                raise self.failures.pop(0)
            return "response"

        def close(self):
            pass

    busy = Busy([ServiceCallError(503, "Model \"lvlm\" has no worker to serve inference"),
                 ServiceCallError("INTERNAL", "Model lvlm has no worker to serve inference")])
    backend = ServiceBackend("http://fake:8080", client=busy, busy_retry_s=30)
    assert backend._call(object()) == "response" and busy.calls == 3
    assert backend.busy_retries == 2
    for error in (ServiceCallError(400, "question: must not be empty"),
                  ServiceCallError("UNAVAILABLE", "failed to connect to all addresses")):
        refused = Busy([error])
        with pytest.raises(ServiceCallError):
            ServiceBackend("grpc://fake:7070", client=refused)._call(object())
        assert refused.calls == 1
    gives_up = Busy([ServiceCallError(503, "busy")] * 100)
    with pytest.raises(ServiceCallError):
        ServiceBackend("http://fake:8080", client=gives_up, busy_retry_s=0.5)._call(object())
    assert 1 < gives_up.calls < 10
