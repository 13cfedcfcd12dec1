"""Statistics, the printed/markdown table and the Pillow-drawn latency plot of a load run."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .loadgen import Result, is_rejection


def pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


def summarize(results: Sequence[Result], wall_s: float) -> dict:
    """Accounting and figures for one step. `sent == ok + errors` by construction; the check
    that matters is that every error has a kind (no empty kinds, no lost results)."""
    ok = [r for r in results if r.kind == "ok"]
    errors = Counter(r.kind for r in results if r.kind != "ok")
    retried = Counter(k for r in results for k in r.rejected)
    lat = [r.latency for r in ok]
    svc = [r.service_latency for r in ok]
    ttfm = [r.first_part for r in ok if r.first_part is not None]
    final_rejections = sum(n for k, n in errors.items() if is_rejection(k))
    return {
        "sent": len(results),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "errors_by_kind": dict(sorted(errors.items())),
        "unexpected": sum(1 for r in results if not r.expected),
        "errors_without_kind": sum(1 for r in results if not r.kind),
        "final_rejections": final_rejections,
        "retried_rejections": sum(retried.values()),
        "retried_by_kind": dict(sorted(retried.items())),
        "attempts": sum(r.attempts for r in results),
        "wall_s": wall_s,
        "throughput_ok_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "latency_s": {f"p{q}": pct(lat, q) for q in (50, 95, 99)} | {
            "mean": float(np.mean(lat)) if lat else None, "max": max(lat) if lat else None},
        "service_latency_s": {f"p{q}": pct(svc, q) for q in (50, 95, 99)},
        "first_message_s": {f"p{q}": pct(ttfm, q) for q in (50, 95, 99)},
        "request_bytes_mean": float(np.mean([r.request_bytes for r in results])) if results
        else None,
        "response_bytes_mean": float(np.mean([r.response_bytes for r in ok])) if ok else None,
        "response_bytes_max": max((r.response_bytes for r in ok), default=None),
    }


def _f(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


COLUMNS = ["profile", "transport", "conc", "sent", "ok", "unserved", "err", "ok/s", "p50 s",
           "p95 s", "p99 s", "svc p50 s", "1st msg p50 s", "1st msg p95 s", "att/req", "req B",
           "resp B", "errors by kind"]


def rows(steps: Sequence[dict]) -> list[list[str]]:
    """`unserved`: still refused (no free worker) when the step ended, after retrying; `err`:
    every other error; `svc`: the accepted attempt alone (the work, without the wait)."""
    out = []
    for s in steps:
        m = s["summary"]
        errs = ", ".join(f"{k} x{n}" for k, n in m["errors_by_kind"].items()) or "-"
        unserved = m["final_rejections"]
        out.append([s["profile"], s["transport"], str(s["concurrency"]), str(m["sent"]),
                    str(m["ok"]), str(unserved), str(m["errors"] - unserved),
                    _f(m["throughput_ok_per_s"]),
                    _f(m["latency_s"]["p50"]), _f(m["latency_s"]["p95"]),
                    _f(m["latency_s"]["p99"]), _f(m["service_latency_s"]["p50"]),
                    _f(m["first_message_s"]["p50"]),
                    _f(m["first_message_s"]["p95"]),
                    _f(m["attempts"] / m["sent"] if m["sent"] else None, "{:.1f}"),
                    _f(m["request_bytes_mean"], "{:.0f}"), _f(m["response_bytes_mean"], "{:.0f}"),
                    errs])
    return out


def text_table(steps: Sequence[dict]) -> str:
    data = [COLUMNS, *rows(steps)]
    widths = [max(len(r[i]) for r in data) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in data]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(steps: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(steps)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Plot (Pillow only)
# ------------------------------------------------------------------------------------------------

COLORS = {"rest": (31, 119, 180), "grpc": (230, 120, 20)}
STYLES = {"p50": (3, None), "p95": (2, (10, 6)), "p99": (1, (3, 4)), "1st msg p50": (2, (2, 3))}


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _line(draw, pts, color, width, dash):
    if dash is None:
        draw.line(pts, fill=color, width=width)
        for p in pts:
            draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=color)
        return
    on, off = dash
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        length = ((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5 or 1.0
        t = 0.0
        while t < length:
            t1 = min(t + on, length)
            draw.line([(x0 + (x1 - x0) * t / length, y0 + (y1 - y0) * t / length),
                       (x0 + (x1 - x0) * t1 / length, y0 + (y1 - y0) * t1 / length)],
                      fill=color, width=width)
            t += on + off
    for p in pts:
        draw.rectangle([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)


def _panel(draw, box, title, xs, series, ylabel, fonts):
    """series: list of (label, color, style, [y or None per x])."""
    x0, y0, x1, y1 = box
    left, bottom, top, right = x0 + 60, y1 - 40, y0 + 30, x1 - 15
    draw.text((x0 + 60, y0 + 5), title, fill="black", font=fonts[1])
    ymax = max([v for *_, ys in series for v in ys if v is not None] or [1.0]) * 1.1 or 1.0
    step = 10 ** np.floor(np.log10(ymax / 5)) if ymax > 0 else 1
    for mult in (1, 2, 5, 10):
        if ymax / (step * mult) <= 6:
            step *= mult
            break
    draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    v = 0.0
    while v <= ymax:
        y = bottom - (bottom - top) * v / ymax
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        draw.text((x0 + 5, y - 7), f"{v:g}", fill="black", font=fonts[0])
        v += step
    xpos = [left + 25 + (right - left - 50) * i / max(1, len(xs) - 1) for i in range(len(xs))]
    for x, label in zip(xpos, xs, strict=True):
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.text((x - 6, bottom + 8), str(label), fill="black", font=fonts[0])
    draw.text(((left + right) / 2 - 40, bottom + 22), "concurrency", fill="black", font=fonts[0])
    draw.text((x0 + 5, top - 22), ylabel, fill="black", font=fonts[0])
    for _, color, (width, dash), ys in series:
        pts = [(x, bottom - (bottom - top) * v / ymax) for x, v in zip(xpos, ys, strict=True)
               if v is not None]
        if pts:
            _line(draw, pts, color, width, dash)


def plot(steps: Sequence[dict], path: Path, title: str) -> None:
    from PIL import Image, ImageDraw

    profiles = list(dict.fromkeys(s["profile"] for s in steps))
    transports = list(dict.fromkeys(s["transport"] for s in steps))
    xs = sorted({s["concurrency"] for s in steps})
    pw, ph = 560, 330
    height = 40 + 2 * ph + 15 + 22 * len(transports) + 15
    img = Image.new("RGB", (max(pw * len(profiles) + 20, 640), height), "white")
    draw = ImageDraw.Draw(img)
    fonts = (_font(12), _font(15), _font(17))
    draw.text((15, 10), title, fill="black", font=fonts[2])
    for col, profile in enumerate(profiles):
        lat_series, thr_series = [], []
        for t in transports:
            by_c = {s["concurrency"]: s["summary"] for s in steps
                    if s["profile"] == profile and s["transport"] == t}
            for key in ("p50", "p95", "p99"):
                lat_series.append((f"{t} {key}", COLORS.get(t, (0, 0, 0)), STYLES[key],
                                   [by_c[c]["latency_s"][key] if c in by_c else None
                                    for c in xs]))
            lat_series.append((f"{t} 1st msg p50", tuple(int(v * 0.55 + 110) for v in
                                                         COLORS.get(t, (0, 0, 0))),
                               STYLES["1st msg p50"],
                               [by_c[c]["first_message_s"]["p50"] if c in by_c else None
                                for c in xs]))
            thr_series.append((t, COLORS.get(t, (0, 0, 0)), STYLES["p50"],
                               [by_c[c]["throughput_ok_per_s"] if c in by_c else None
                                for c in xs]))
        _panel(draw, (10 + col * pw, 40, 10 + (col + 1) * pw, 40 + ph),
               f"{profile}: latency of successful requests", xs, lat_series, "seconds", fonts)
        _panel(draw, (10 + col * pw, 40 + ph, 10 + (col + 1) * pw, 40 + 2 * ph),
               f"{profile}: throughput (successful requests/s)", xs, thr_series, "req/s", fonts)
    # legend
    y = 40 + 2 * ph + 15
    x = 20
    for t in transports:
        for key in ("p50", "p95", "p99", "1st msg p50"):
            color = COLORS.get(t, (0, 0, 0))
            if key == "1st msg p50":
                color = tuple(int(v * 0.55 + 110) for v in color)
            width, dash = STYLES[key]
            _line(draw, [(x, y + 7), (x + 40, y + 7)], color, width, dash)
            draw.text((x + 46, y), f"{t} {key}", fill="black", font=fonts[0])
            x += 150
        x, y = 20, y + 22
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main(argv: list[str] | None = None) -> int:
    """`python -m loadtests.report runs/load/report.json [--png PATH]`: print the table again
    and redraw the tables and the plot next to the report (or at --png)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("report", type=Path)
    parser.add_argument("--png", type=Path)
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    steps, out = report["steps"], args.report.parent
    (out / "table.md").write_text(markdown_table(steps) + "\n")
    (out / "table.txt").write_text(text_table(steps) + "\n")
    plot(steps, args.png or out / "load-latency.png", args.title or report.get("title", ""))
    print(text_table(steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
