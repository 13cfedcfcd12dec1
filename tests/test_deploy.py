"""Deployment artefacts: k8s validation (same script as `make k8s-validate`), alert rules vs the
metrics the service exports, hardened TorchServe config, .mar build, startup probe."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = ROOT / "k8s"
RULES = K8S / "components" / "monitoring" / "prometheusrule.yaml"
SCALEDOBJECT = K8S / "components" / "autoscaling-keda" / "scaledobject.yaml"
ADAPTER_RULES = K8S / "components" / "autoscaling-prometheus-adapter" / "adapter-rules.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
# labels Prometheus adds when scraping through a PodMonitor
SCRAPE_LABELS = {"namespace", "pod", "container", "endpoint", "job", "instance", "service"}

sys.path.insert(0, str(DEPLOY / "scripts"))


# --------------------------------------------------------------------------------------------
# helpers


def exported_series() -> dict[str, set[str]]:
    """Series names (and their labels) TorchServe 0.12 exports for deploy/metrics.yaml.

    Verified in the 0.12.0 frontend (prometheus simpleclient 0.9): names are used verbatim
    (a counter gets no _total suffix added or stripped), histograms expose _bucket (+le), _sum and
    _count, and every model metric gets a trailing Hostname label."""
    spec = yaml.safe_load((DEPLOY / "metrics.yaml").read_text())
    out: dict[str, set[str]] = {}
    for section, extra in (("ts_metrics", set()), ("model_metrics", {"Hostname"})):
        for kind, metrics in (spec.get(section) or {}).items():
            for m in metrics or []:
                labels = set(m.get("dimensions") or []) | extra
                if kind == "histogram":
                    out[m["name"] + "_bucket"] = labels | {"le"}
                    out[m["name"] + "_sum"] = labels
                    out[m["name"] + "_count"] = labels
                else:
                    out[m["name"]] = labels
    return out


PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
                   "group_right", "offset", "bool", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def promql_selectors(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """({metric name: label names used in its matchers}, labels used in grouping clauses)."""
    s = _STRING.sub('""', expr)
    grouping = {lbl.strip() for m in _GROUPING.finditer(s) for lbl in m.group(2).split(",")
                if lbl.strip()}
    s = _GROUPING.sub(" ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range selectors and subqueries
    s = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", s)
    selectors: dict[str, set[str]] = {}
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        tok, before = m.group(0), s[: m.start()]
        if before and (before[-1].isdigit() or before[-1] == "."):
            continue  # exponent of a number literal
        if before.rstrip().endswith("{") or re.search(r"\{[^}]*$", before):
            continue  # inside a label matcher
        rest = s[m.end():].lstrip()
        if tok.lower() in PROMQL_KEYWORDS or rest.startswith("("):
            continue  # keyword, function or aggregation
        labels: set[str] = set()
        if rest.startswith("{"):
            body = rest[1: rest.index("}")]
            labels = {lm.group(1) for lm in re.finditer(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", body)}
        selectors.setdefault(tok, set()).update(labels)
    return selectors, grouping


def rule_exprs() -> list[tuple[str, str]]:
    doc = yaml.safe_load(RULES.read_text())
    out = []
    for group in doc["spec"]["groups"]:
        for rule in group["rules"]:
            out.append((rule.get("record") or rule["alert"], rule["expr"]))
    return out


def check_exprs(named_exprs: list[tuple[str, str]], recorded: set[str]) -> list[str]:
    exported = exported_series()
    all_labels = set().union(*exported.values()) | SCRAPE_LABELS | {"le"}
    problems = []
    for name, expr in named_exprs:
        selectors, grouping = promql_selectors(expr)
        if not selectors:
            problems.append(f"{name}: no metric found in {expr!r}")
        for metric, labels in selectors.items():
            if metric in recorded:
                continue
            if metric not in exported:
                problems.append(f"{name}: metric {metric!r} is not exported (deploy/metrics.yaml)")
                continue
            unknown = labels - exported[metric] - SCRAPE_LABELS
            if unknown:
                problems.append(f"{name}: {metric} has no label(s) {sorted(unknown)}")
        if grouping - all_labels:
            problems.append(f"{name}: grouping by unknown label(s) {sorted(grouping - all_labels)}")
    return problems


def github_anchor(heading: str) -> str:
    slug = heading.strip().lower()
    slug = re.sub(r"[^\w\- ]", "", slug)
    return slug.replace(" ", "-")


def render(overlay: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not on PATH (test_k8s_validate fails with the reason)")
    import k8s_validate

    return k8s_validate.render(K8S / "overlays" / overlay, "kubectl")


def read_properties(path: Path) -> dict[str, str]:
    props = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props


# --------------------------------------------------------------------------------------------
# k8s validation (CI runs exactly what `make k8s-validate` runs)


def test_k8s_validate_script_passes_for_every_overlay():
    assert shutil.which("kubectl"), (
        "kubectl is required to render the kustomize overlays (kubectl >= 1.27); "
        "see deploy/scripts/k8s_validate.sh")
    proc = subprocess.run(["bash", str(DEPLOY / "scripts" / "k8s_validate.sh")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    overlays = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
    assert {"cpu-dev", "gpu"} <= set(overlays)
    for overlay in overlays:
        assert re.search(rf"^ok +{re.escape(overlay)}:", proc.stdout, re.M), overlay
    if "SKIP promtool" not in proc.stdout:
        assert "promtool checks passed" in proc.stdout


def test_validator_rejects_unknown_fields_and_bad_crd_objects():
    import k8s_validate

    docs = render("gpu")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(Exception, match="securityContxt"):
        k8s_validate.validate_doc(dep, k8s_validate.DEFAULT_K8S_VERSION)
    pm = next(d for d in docs if d["kind"] == "PodMonitor")
    pm["spec"]["podMetricsEndpoints"][0]["prot"] = "metrics"
    with pytest.raises(ValueError, match="prot"):
        k8s_validate.validate_doc(pm, k8s_validate.DEFAULT_K8S_VERSION)
    so = next(d for d in docs if d["kind"] == "ScaledObject")
    del so["spec"]["scaleTargetRef"]
    with pytest.raises(ValueError, match="scaleTargetRef"):
        k8s_validate.validate_doc(so, k8s_validate.DEFAULT_K8S_VERSION)
    with pytest.raises(LookupError):
        k8s_validate.validate_doc({"apiVersion": "example.com/v1", "kind": "Widget"},
                                  k8s_validate.DEFAULT_K8S_VERSION)


# --------------------------------------------------------------------------------------------
# alert rules reference only exported metrics


def test_exported_series_follow_torchserve_naming():
    series = exported_series()
    assert series["lvlm_requests_total"] == {"outcome", "transport", "ModelName", "Level",
                                             "Hostname"}
    for h in ("lvlm_stage_latency_seconds", "lvlm_answer_tokens", "lvlm_visual_tokens",
              "lvlm_grounding_score"):
        assert {h + "_bucket", h + "_sum", h + "_count"} <= set(series)
        assert h not in series
    assert series["lvlm_stage_latency_seconds_bucket"] >= {"stage", "method", "transport", "le"}
    assert "lvlm_requests_total_total" not in series


def test_promql_parser_finds_metrics_and_labels():
    sel, grouping = promql_selectors(
        'sum by (namespace, le) (rate(foo_bucket{stage="a,b}", x=~"y"}[5m] offset 1h)) / '
        "on (namespace) group_left bar:rec * 1e3 > 0.5 and absent(baz)")
    assert sel == {"foo_bucket": {"stage", "x"}, "bar:rec": set(), "baz": set()}
    assert grouping == {"namespace", "le"}


def test_alert_rules_reference_only_exported_metrics():
    exprs = rule_exprs()
    recorded = {name for name, _ in exprs if ":" in name}
    alerts = [name for name, _ in exprs if ":" not in name]
    assert {"LvlmLatencyP99High", "LvlmErrorRateHigh", "LvlmGroundingScoreDrop"} <= set(alerts)
    assert check_exprs(exprs, recorded) == []
    used = set().union(*(promql_selectors(e)[0] for _, e in exprs))
    assert {"lvlm_stage_latency_seconds_bucket", "lvlm_requests_total",
            "lvlm_grounding_score_sum", "lvlm_grounding_score_count"} <= used


def test_autoscaling_queries_reference_only_exported_metrics():
    so = yaml.safe_load(SCALEDOBJECT.read_text())
    queries = [(f"keda:{t['name']}", t["metadata"]["query"]) for t in so["spec"]["triggers"]]
    adapter = yaml.safe_load(ADAPTER_RULES.read_text())
    for rule in adapter["rules"]["custom"]:
        queries.append(("adapter:seriesQuery", rule["seriesQuery"]))
    assert check_exprs(queries, set()) == []


def test_check_catches_unexported_metric_and_label():
    problems = check_exprs([("bad", 'rate(lvlm_request_total[5m])'),
                            ("bad2", 'rate(lvlm_requests_total{outcom="error"}[5m])'),
                            ("bad3", 'histogram_quantile(0.9, lvlm_stage_latency_seconds[5m])')],
                           set())
    assert len(problems) == 3, problems


def test_every_alert_has_a_runbook_section():
    doc = yaml.safe_load(RULES.read_text())
    text = OPERATIONS.read_text()
    anchors = {github_anchor(h) for h in re.findall(r"^#+\s+(.+)$", text, re.M)}
    for group in doc["spec"]["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            runbook = rule["annotations"]["runbook"]
            path, _, anchor = runbook.partition("#")
            assert path == "docs/operations.md"
            assert anchor in anchors, f"{rule['alert']}: no heading for #{anchor} in {path}"
            assert rule["labels"]["severity"] in {"warning", "critical"}


# --------------------------------------------------------------------------------------------
# TorchServe configuration


def test_config_properties_hardened():
    local = read_properties(DEPLOY / "config.properties")
    pod = read_properties(K8S / "base" / "config.properties")
    for props in (local, pod):
        assert props["management_address"] == "http://127.0.0.1:8081"
        assert props["grpc_management_address"] == "127.0.0.1"
        assert props["grpc_management_port"] == "7071"
        assert props["enable_model_api"] == "false"
        assert props["disable_token_authorization"] == "true"
        assert props["install_py_dep_per_model"] == "false"
        assert props["metrics_mode"] == "prometheus"
        assert props["metrics_config"].endswith("deploy/metrics.yaml")
        assert props["load_models"] == "lvlm.mar"
        assert "http" not in props["allowed_urls"] and "s3" not in props["allowed_urls"]
        assert props["allowed_urls"].startswith("file://")
        # 4,000,000-byte image, base64 in JSON, plus question and options
        assert int(props["max_request_size"]) >= 4_000_000 * 4 // 3 + 64_000
        assert int(props["max_response_size"]) >= 6_553_500
    assert local["inference_address"] == "http://127.0.0.1:8080"
    assert local["metrics_address"] == "http://127.0.0.1:8082"
    assert local["grpc_inference_address"] == "127.0.0.1"
    assert pod["inference_address"] == "http://0.0.0.0:8080"
    assert pod["metrics_address"] == "http://0.0.0.0:8082"
    assert pod["grpc_inference_address"] == "127.0.0.1"  # the gateway is the pod's gRPC API
    # the two files differ only in where things listen and live
    allowed = {"inference_address", "metrics_address", "grpc_inference_address", "model_store",
               "allowed_urls", "metrics_config"}
    assert set(local) == set(pod)
    assert {k for k in local if local[k] != pod[k]} <= allowed


def test_allowed_urls_only_match_the_local_store():
    for path, store in ((DEPLOY / "config.properties", "/home/dev/repo/model_store"),
                        (K8S / "base" / "config.properties", "/opt/lvlm/model_store")):
        pattern = re.compile(read_properties(path)["allowed_urls"])
        assert pattern.fullmatch(f"file://{store}/lvlm.mar")
        for bad in ("https://evil.example/lvlm.mar", "s3://bucket/lvlm.mar",
                    f"file://{store}/../../etc/passwd", "file:///etc/passwd"):
            assert not pattern.fullmatch(bad), bad


PROFILES = [("model-config.monitoring.yaml", "cpu", 8), ("model-config.yaml", "cpu", 1),
            ("model-config.gpu.yaml", "cuda", 1)]


@pytest.mark.parametrize("name,device,batch", PROFILES)
def test_model_configs(name, device, batch):
    from lvlm_attribution.service import ServiceConfig

    cfg = yaml.safe_load((DEPLOY / name).read_text())
    # A bounded queue, not instant refusals (retry storms collapse throughput, docs/performance)
    assert cfg["useJobTicket"] is False and 1 <= cfg["jobQueueSize"] <= 64
    assert cfg["minWorkers"] == cfg["maxWorkers"] == 1 and cfg["batchSize"] == batch
    assert cfg["startupTimeout"] >= 60 and cfg["responseTimeout"] >= 60
    h = cfg["handler"]
    assert h["device"] == device
    assert set(h) >= {"model_dir", "device", "dtype", "default_methods", "allowed_methods",
                      "max_new_tokens_cap", "max_image_bytes", "max_image_pixels",
                      "max_question_chars"}
    assert set(h["default_methods"]) <= set(h["allowed_methods"])
    props = read_properties(DEPLOY / "config.properties")
    assert h["max_image_bytes"] * 4 // 3 < int(props["max_request_size"])
    service = ServiceConfig.from_mapping(h)  # the worker's own start-up checks
    service.check_server_limits(cfg["responseTimeout"])
    assert service.max_response_bytes < int(props["max_response_size"])
    if device == "cuda":
        assert h["model_dir"].startswith("/models/") and h["dtype"] == "bfloat16"
    else:
        assert h["model_dir"] == "model_store/tiny-shapes-llava"


def test_metrics_yaml_declares_the_handler_metrics():
    spec = yaml.safe_load((DEPLOY / "metrics.yaml").read_text())["model_metrics"]
    dims = {m["name"]: m["dimensions"] for kind in spec.values() for m in kind}
    assert dims["lvlm_stage_latency_seconds"] == ["stage", "method", "transport", "ModelName",
                                                  "Level"]
    assert dims["lvlm_requests_total"] == ["outcome", "transport", "ModelName", "Level"]
    for h in ("lvlm_answer_tokens", "lvlm_visual_tokens", "lvlm_grounding_score"):
        assert dims[h] == ["ModelName", "Level"]
    assert {m["name"] for m in spec["histogram"]} >= {"lvlm_stage_latency_seconds",
                                                      "lvlm_grounding_score"}
    assert "Hostname" not in {d for ds in dims.values() for d in ds}  # TorchServe adds it


# --------------------------------------------------------------------------------------------
# rendered manifests: policy the schemas cannot express


def _deployment(docs):
    return next(d for d in docs if d["kind"] == "Deployment")


@pytest.mark.parametrize("overlay", ["cpu-dev", "gpu", "gpu-gke", "gpu-eks",
                                     "gpu-prometheus-adapter"])
def test_rendered_overlay_policy(overlay):
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy",
            "ConfigMap"} <= kinds
    pod = _deployment(docs)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert "limits" in c["resources"]
    ts = next(c for c in pod["containers"] if c["name"] == "torchserve")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # never /ping alone
        assert "probe_model_ready.py" in " ".join(ts[probe]["exec"]["command"]), probe
    assert ts["readinessProbe"]["failureThreshold"] == 1  # out within one period
    live = ts["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 180  # lenient
    gpu = overlay.startswith("gpu")
    cfg = yaml.safe_load((DEPLOY / ("model-config.gpu.yaml" if gpu else "model-config.yaml"))
                         .read_text())
    pre_stop = ts["lifecycle"]["preStop"]["exec"]["command"]
    assert "drain.py" in " ".join(pre_stop)
    delay = float(pre_stop[pre_stop.index("--delay") + 1])
    drain_timeout = float(pre_stop[pre_stop.index("--timeout") + 1])
    assert drain_timeout >= cfg["responseTimeout"]
    assert pod["terminationGracePeriodSeconds"] >= delay + drain_timeout + 5
    start = ts["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= cfg["startupTimeout"]
    svc = next(d for d in docs if d["kind"] == "Service")
    assert {p["port"] for p in svc["spec"]["ports"]} == {8080, 50051, 8082}  # 50051: gateway
    assert {p["containerPort"] for p in ts["ports"]} == {8080, 8082}  # raw gRPC: loopback
    pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
    labels = pod_labels = _deployment(docs)["spec"]["template"]["metadata"]["labels"]
    for selector in (pdb["spec"]["selector"]["matchLabels"],
                     next(d for d in docs if d["kind"] == "NetworkPolicy")["spec"]["podSelector"]
                     ["matchLabels"], svc["spec"]["selector"]):
        assert selector.items() <= pod_labels.items()
    assert labels
    if gpu:
        assert ts["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert pod["nodeSelector"]
        mounts = {m["mountPath"]: m for m in ts["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True
        assert "lvlm" in ts["args"] and "/opt/lvlm/model_store_gpu" in ts["args"]
        autoscalers = [d for d in docs if d["kind"] in ("ScaledObject",
                                                        "HorizontalPodAutoscaler")]
        assert len(autoscalers) == 1
        assert "replicas" not in _deployment(docs)["spec"]  # owned by the autoscaler
        a = autoscalers[0]["spec"]
        behavior = (a.get("behavior") or
                    a["advanced"]["horizontalPodAutoscalerConfig"]["behavior"])
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 900
        assert {"PodMonitor", "PrometheusRule"} <= kinds
    else:
        assert "nvidia.com/gpu" not in json.dumps(pod)
        assert not kinds & {"PodMonitor", "PrometheusRule", "ScaledObject"}  # any cluster


# --------------------------------------------------------------------------------------------
# .mar build, probe, Dockerfile


def _stub_handler(tmp_path: Path, body: str = "") -> Path:
    handler = tmp_path / "handlers" / "stub_handler.py"
    handler.parent.mkdir(parents=True, exist_ok=True)
    handler.write_text(body or "def handle(data, context):\n"
                               "    return None if data is None else ['ok' for _ in data]\n")
    (handler.parent / "helper.py").write_text("X = 1\n")
    return handler


def test_build_mar_default_and_no_archive(tmp_path):
    handler = _stub_handler(tmp_path)
    script = DEPLOY / "scripts" / "build_mar.sh"
    out = tmp_path / "store"
    subprocess.run(["bash", str(script), "--handler", str(handler), "--out", str(out)],
                   check=True, capture_output=True, timeout=120)
    with zipfile.ZipFile(out / "lvlm.mar") as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
    assert {"stub_handler.py", "helper.py", "model-config.yaml"} <= names
    assert manifest["model"]["modelName"] == "lvlm"
    assert manifest["model"]["configFile"] == "model-config.yaml"
    subprocess.run(["bash", str(script), "--handler", str(handler), "--out", str(out),
                    "--format", "no-archive", "--config", "deploy/model-config.gpu.yaml"],
                   check=True, capture_output=True, timeout=120)
    manifest = json.loads((out / "lvlm" / "MAR-INF" / "MANIFEST.json").read_text())
    assert manifest["model"]["configFile"] == "model-config.gpu.yaml"
    assert (out / "lvlm" / "model-config.gpu.yaml").is_file()
    bad = subprocess.run(["bash", str(script), "--format", "zip"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "--format" in bad.stderr


class _FakeManagement(http.server.BaseHTTPRequestHandler):
    status = "READY"
    pid = os.getpid()

    def do_GET(self):  # noqa: N802
        body = json.dumps([{"modelName": "lvlm", "workers": [{"id": "9000", "pid": self.pid,
                                                               "status": self.status}]}])
        self.send_response(200 if self.path == "/models/lvlm" else 404)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


def test_probe_model_ready(capsys):
    """READY is not enough: the listed worker process must exist and be runnable."""
    import probe_model_ready

    server = http.server.HTTPServer(("127.0.0.1", 0), _FakeManagement)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert probe_model_ready.main(["--url", url]) == 0
        _FakeManagement.status = "UNLOADING"
        assert probe_model_ready.main(["--url", url]) == 1
        _FakeManagement.status = "READY"
        assert probe_model_ready.main(["--url", url, "--model", "other"]) == 1
        _FakeManagement.pid = sleeper.pid
        sleeper.send_signal(signal.SIGSTOP)  # a wedged worker
        _wait_for_state(sleeper.pid, "T")
        assert probe_model_ready.main(["--url", url]) == 1
        assert "is stopped" in capsys.readouterr().err
        sleeper.send_signal(signal.SIGCONT)
        assert probe_model_ready.main(["--url", url]) == 0
        sleeper.kill()
        sleeper.wait()  # the stale-READY case: TorchServe still lists a pid that is gone
        assert probe_model_ready.main(["--url", url]) == 1
        assert "listed READY but process" in capsys.readouterr().err
        assert probe_model_ready.main(["--url", url, "--no-pid-check"]) == 0
    finally:
        _FakeManagement.status, _FakeManagement.pid = "READY", os.getpid()
        sleeper.kill()
        server.shutdown()
    assert probe_model_ready.main(["--url", "http://127.0.0.1:9", "--timeout", "1"]) == 1


def _wait_for_state(pid: int, state: str) -> None:
    for _ in range(100):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[-1].split()[0] == state:
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} never reached state {state}")


def test_dockerfile_conventions():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    froms = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ln.split()[1])
             for ln in lines if ln.upper().startswith("FROM ")]
    assert froms and all(re.search(r":\d+\.\d+\.\d+", f) and ":latest" not in f
                         for f in froms), froms
    users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0") and users[-1].split(":")[0].isdigit()
    assert "torchserve==0.12.0" in text and "torch-model-archiver==0.12.0" in text
    assert re.search(r"^ARG TORCH_VERSION=\d+\.\d+\.\d+$", text, re.M)
    assert "torch==${TORCH_VERSION}" in text
    assert "/models" not in " ".join(ln for ln in lines if ln.upper().startswith(("COPY", "ADD")))
    assert "HEALTHCHECK" in text and "tini" in text


# --------------------------------------------------------------------------------------------
# real TorchServe: the names it exposes for our metrics.yaml are the ones the alerts use


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EMITTER = '''
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes


def handle(data, context):
    if data is None:
        return None
    m = context.metrics
    for stage in ("decode", "total"):
        m.add_metric("lvlm_stage_latency_seconds", 0.25, "s",
                     dimensions=[Dimension("stage", stage), Dimension("method", "-"),
                                 Dimension("transport", "rest")],
                     metric_type=MetricTypes.HISTOGRAM)
    m.add_metric("lvlm_requests_total", 1, "Count",
                 dimensions=[Dimension("outcome", "ok"), Dimension("transport", "rest")],
                 metric_type=MetricTypes.COUNTER)
    for name, value in (("lvlm_answer_tokens", 3), ("lvlm_visual_tokens", 64),
                        ("lvlm_grounding_score", 0.75)):
        m.add_metric(name, value, "Count", metric_type=MetricTypes.HISTOGRAM)
    return ["ok" for _ in data]
'''


@contextlib.contextmanager
def _torchserve(tmp_path: Path, handler_body: str, config: Path = DEPLOY / "config.properties"):
    """Start a real TorchServe on free ports with our config.properties and metrics.yaml and a
    stub handler archived by build_mar.sh; yields {port name: port}. Stops what it started."""
    torchserve = ROOT / ".venv" / "bin" / "torchserve"
    if not torchserve.exists():
        torchserve = Path(shutil.which("torchserve") or "/nonexistent")
    if not torchserve.exists() or shutil.which("java") is None:
        pytest.skip("torchserve or java not available")
    handler = _stub_handler(tmp_path, handler_body)
    store = tmp_path / "model_store"
    subprocess.run(["bash", str(DEPLOY / "scripts" / "build_mar.sh"), "--handler", str(handler),
                    "--out", str(store)], check=True, capture_output=True, timeout=120)
    ports = {p: _free_port() for p in ("8080", "8081", "8082", "7070", "7071")}
    text = config.read_text()
    for old, new in ports.items():
        text = text.replace(f":{old}\n", f":{new}\n").replace(f"_port={old}\n", f"_port={new}\n")
    text = text.replace("model_store=model_store", f"model_store={store}")
    text = text.replace("metrics_config=deploy/metrics.yaml",
                        f"metrics_config={DEPLOY / 'metrics.yaml'}")
    # the pod variant's paths
    text = text.replace("/opt/lvlm/deploy/metrics.yaml", str(DEPLOY / "metrics.yaml"))
    text = text.replace("/opt/lvlm/model_store", str(store))
    (tmp_path / "config.properties").write_text(text)
    # own TMPDIR: the launcher keeps its pid file there and refuses to start a second server
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "LOG_LOCATION": str(tmp_path / "logs"),
           "METRICS_LOCATION": str(tmp_path / "logs"), "TMPDIR": str(tmp_path / "tmp")}
    log = open(tmp_path / "ts.log", "wb")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen([str(torchserve), "--start", "--foreground", "--ncs", "--ts-config",
                             str(tmp_path / "config.properties")], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        import probe_model_ready

        deadline = time.time() + 90
        while probe_model_ready.main(["--url", f"http://127.0.0.1:{ports['8081']}"]) != 0:
            assert proc.poll() is None and time.time() < deadline, (
                (tmp_path / "ts.log").read_text()[-3000:])
            time.sleep(1)
        yield ports | {"pgid": proc.pid}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _post(port: int, timeout: float = 30) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/predictions/lvlm", data=b"{}",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _listening(pgid: int) -> dict[int, set[str]]:
    """{port: listen addresses} of the processes in TorchServe's process group."""
    import psutil

    listening: dict[int, set[str]] = {}
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) != pgid:
                continue
            conns = proc.net_connections(kind="tcp")
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                listening.setdefault(c.laddr.port, set()).add(c.laddr.ip)
    return listening


@pytest.mark.integration
def test_real_torchserve_with_pod_config_exports_the_alerted_metrics(tmp_path):
    """k8s/base/config.properties on a real TorchServe: what listens where, and the names of
    the series it exports for deploy/metrics.yaml are the ones the alerts use."""
    with _torchserve(tmp_path, EMITTER, config=K8S / "base" / "config.properties") as ports:
        listening = _listening(ports["pgid"])
        loopback = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
        # management REST and gRPC, raw gRPC inference (behind the gateway): pod-local only
        for name in ("8081", "7071", "7070"):
            assert listening.get(ports[name]) and listening[ports[name]] <= loopback, name
        for name in ("8080", "8082"):  # inference REST, metrics
            assert listening.get(ports[name], set()) & {"0.0.0.0", "::"}, (name, listening)
        assert _post(ports["8080"]) == (200, b"ok")
        scraped: dict[str, set[str]] = {}
        for _ in range(20):
            body = urllib.request.urlopen(f"http://127.0.0.1:{ports['8082']}/metrics",
                                          timeout=10).read().decode()
            for line in body.splitlines():
                m = re.match(r"([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s", line)
                if m and not line.startswith("#"):
                    labels = set(re.findall(r'(\w+)="', m.group(2) or ""))
                    scraped.setdefault(m.group(1), set()).update(labels)
            if "lvlm_requests_total" in scraped:
                break
            time.sleep(0.5)
    declared = exported_series()
    used = set().union(*(promql_selectors(e)[0] for _, e in rule_exprs()))
    for name in used - {n for n, _ in rule_exprs() if ":" in n}:
        if name.startswith("lvlm_"):
            assert name in scraped, f"{name} not in the real exposition: {sorted(scraped)}"
            assert scraped[name] - {"le"} == declared[name] - {"le"}, name
    assert scraped["lvlm_requests_total"] >= {"outcome", "transport", "ModelName", "Level",
                                              "Hostname"}
    for lvlm_name in (n for n in scraped if n.startswith("lvlm_")):
        assert lvlm_name in declared, f"exported {lvlm_name} not derivable from metrics.yaml"


SLOW = """
import time


def handle(data, context):
    if data is None:
        return None
    time.sleep(float(data[0].get("body", {}).get("sleep", 0)) if isinstance(
        data[0].get("body"), dict) else 0)
    return ["done" for _ in data]
"""


@pytest.mark.integration
def test_requests_queue_and_drain_lets_inflight_request_finish(tmp_path):
    """The model configs queue (useJobTicket: false): a request behind a busy worker waits and
    is answered, not refused; the preStop drain returns only after the in-flight request."""
    import drain

    with _torchserve(tmp_path, SLOW) as ports:
        port = ports["8080"]
        result: dict = {}

        def slow_request():
            req = urllib.request.Request(f"http://127.0.0.1:{port}/predictions/lvlm",
                                         data=b'{"sleep": 8}',
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as resp:
                result["status"], result["body"] = resp.status, resp.read()

        t = threading.Thread(target=slow_request)
        t.start()
        time.sleep(1.0)
        # still queued behind the 8 s request after 2 s: busy, not refused, not "not answering"
        assert drain.worker_free(f"http://127.0.0.1:{port}", "lvlm", 2) is False
        assert drain.main(["--url", f"http://127.0.0.1:{port}", "--delay", "0",
                           "--timeout", "30", "--interval", "0.2"]) == 0
        # drain returned only after the in-flight request had finished
        assert result == {"status": 200, "body": b"done"}
        t.join(timeout=30)


class _Busy(http.server.BaseHTTPRequestHandler):
    answers: list[int] = []

    def do_POST(self):  # noqa: N802
        code = self.answers.pop(0) if self.answers else 400
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_drain_waits_while_busy():
    import drain

    _Busy.answers = [503, 503, 503]
    server = http.server.HTTPServer(("127.0.0.1", 0), _Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        t0 = time.monotonic()
        assert drain.main(["--url", url, "--delay", "0", "--interval", "0.1"]) == 0
        assert _Busy.answers == [] and time.monotonic() - t0 >= 0.3
        _Busy.answers = [503] * 1000
        t0 = time.monotonic()
        drain.main(["--url", url, "--delay", "0", "--interval", "0.05", "--timeout", "0.5"])
        assert 0.5 <= time.monotonic() - t0 < 5  # gives up at the deadline
    finally:
        server.shutdown()
    assert drain.worker_free("http://127.0.0.1:9", "lvlm", 1) is None


def _jar_strings(class_path: str) -> set[str]:
    """Identifier-like constants of a class in TorchServe's frontend jar (the keys it reads)."""
    ts = pytest.importorskip("ts")
    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    if not jar.exists():
        pytest.skip("TorchServe frontend jar not found")
    with zipfile.ZipFile(jar) as z:
        data = z.read(class_path)
    return {m.decode() for m in re.findall(rb"[A-Za-z_][A-Za-z0-9_]{2,}", data)}


def test_config_keys_are_known_to_torchserve():
    known = _jar_strings("org/pytorch/serve/util/ConfigManager.class")
    for path in (DEPLOY / "config.properties", K8S / "base" / "config.properties"):
        unknown = set(read_properties(path)) - known
        assert not unknown, f"{path.name}: keys TorchServe 0.12 does not read: {sorted(unknown)}"
    model_known = _jar_strings("org/pytorch/serve/archive/model/ModelConfig.class")
    for name, _, _ in PROFILES:
        keys = set(yaml.safe_load((DEPLOY / name).read_text())) - {"handler"}
        unknown = keys - model_known
        assert not unknown, f"{name}: keys TorchServe 0.12 does not read: {sorted(unknown)}"

