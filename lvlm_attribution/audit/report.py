"""Self-contained HTML: one report per item (its picture inlined as a data: URI) and the batch
index (thumbnails referenced as relative files inside the output folder). No network, no
JavaScript needed to read either (the index has a few lines of optional inline JS to re-sort);
every piece of user text goes through `html.escape`.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Sequence
from html import escape
from typing import Any

from .record import ItemRecord, clean_token

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px;
color:#1a1a1a;background:#fff;max-width:1200px}
h1{font-size:22px;margin:0 0 12px}h2{font-size:17px;margin:22px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#f1f1f1}td.num{text-align:right;
font-variant-numeric:tabular-nums}
dl.meta{display:grid;grid-template-columns:max-content auto;gap:3px 14px;font-size:14px}
dl.meta dt{font-weight:600}dl.meta dd{margin:0}
.tokens{font-size:20px;line-height:2.6;margin:4px 0}
.tok{padding:3px 5px;margin:0 2px;border-radius:4px;border:1px solid #bbb;white-space:pre}
.tok.flag{outline:3px solid #d00000;outline-offset:1px}
.badge{font-size:11px;color:#fff;background:#d00000;border-radius:3px;padding:1px 4px;
margin-left:3px;vertical-align:super;white-space:nowrap}
.rowlabel{display:inline-block;min-width:170px;font-size:13px;color:#555}
.legend{font-size:12px;color:#555}.swatch{display:inline-block;width:120px;height:12px;
vertical-align:middle;border:1px solid #aaa;background:linear-gradient(to right,
rgba(255,140,0,.08),rgba(255,140,0,.9))}
.err{color:#b00000;font-weight:600}.score-low{color:#b00000;font-weight:600}
.scroll{overflow-x:auto;max-width:100%}
.atok{white-space:pre}.atok.flag{outline:2px solid #d00000;outline-offset:1px;border-radius:2px;
color:#b00000;font-weight:600}
img.overlay{max-width:100%;border:1px solid #ccc}img.thumb{height:72px;border:1px solid #ccc}
"""


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.3e}"


def _shade(unit: float) -> str:
    """Background for a weight scaled to [0, 1]: white to orange; text stays dark (readable)."""
    unit = 0.0 if not math.isfinite(unit) else min(max(unit, 0.0), 1.0)
    return f"background:rgba(255,140,0,{0.08 + 0.82 * unit:.3f})"


def _scaled(values: Sequence[float]) -> list[float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return [0.0] * len(values)
    lo, hi = min(min(finite), 0.0), max(finite)
    return [(v - lo) / (hi - lo) if hi > lo and math.isfinite(v) else 0.0 for v in values]


def _token_row(label: str, texts: Sequence[str], values: Sequence[float],
               flagged: set[int] | None = None, kind: str = "answer") -> str:
    flagged = flagged or set()
    spans = []
    for i, (text, unit, raw) in enumerate(zip(texts, _scaled(values), values, strict=True)):
        shown = clean_token(text).strip() or text
        cls = "tok flag" if i in flagged else "tok"
        title = f"{label} = {_fmt(raw, 4)}" + (" — not supported by the image" if i in flagged
                                              else "")
        badge = '<span class="badge">not supported</span>' if i in flagged else ""
        spans.append(f'<span class="{cls}" data-kind="{kind}" data-index="{i}" '
                     f'style="{_shade(unit)}" title="{escape(title)}">{escape(shown)}</span>'
                     f"{badge}")
    return (f'<div class="tokens"><span class="rowlabel">{escape(label)}</span>'
            f'{"".join(spans)}</div>')


def primary_weights(record: ItemRecord) -> list[str]:
    """One weight per method for the coloured rows: the first key each method reports."""
    keys: dict[str, str] = {}
    for token in record.tokens[:1]:
        for key in token.weights:
            keys.setdefault(key.split(".", 1)[0], key)
    return list(keys.values())


def item_html(item_id: str, question: str, given_answer: str, record: ItemRecord,
              overlay_png: bytes, truth: str | None = None, index_href: str = "../../index.html",
              ) -> str:
    score, source = record.score()
    flagged, flag_rule = record.flagged()
    flag_set = set(flagged)
    texts = [t.text for t in record.tokens]
    flagged_words = ", ".join(clean_token(texts[i]).strip() for i in flagged if i < len(texts))
    meta = [("Question", escape(question)), ("Answer (as given)", escape(given_answer)),
            ("Answer (as tokenized)", escape(record.answer)),
            ("Grounding score", f"{escape(_fmt(score, 4))} <span class=legend>"
                                f"({escape(source)})</span>"),
            ("Flagged tokens", (escape(flagged_words) or "none")
             + f" <span class=legend>({escape(flag_rule)})</span>"),
            ("Model", f"{escape(record.model_name)} @ {escape(record.model_version)}"),
            ("Explained by", escape(record.backend)),
            ("Methods", escape(", ".join(record.maps)))]
    if truth is not None:
        meta.insert(2, ("Truth", escape(str(truth))))
    parts = [f"<h1>Audit: {escape(item_id)}</h1>",
             f'<p><a href="{escape(index_href)}">&larr; all items</a></p>',
             '<dl class="meta">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in meta)
             + "</dl>",
             "<h2>Answer tokens, coloured by weight</h2>",
             '<p class="legend">Each row colours the answer\'s tokens by one weight (scaled '
             'to the row\'s maximum): <span class="swatch"></span> low &rarr; high. Tokens '
             'outlined in red with a <span class="badge">not supported</span> label are flagged '
             f"as not supported by the image ({escape(flag_rule)}).</p>"]
    for key in primary_weights(record):
        parts.append(_token_row(key, texts, [t.weights.get(key, 0.0) for t in record.tokens],
                                flag_set))
    llrs = [t.llr for t in record.tokens]
    if any(v is not None for v in llrs):
        parts.append(_token_row("LLR (image vs blurred)", texts,
                                [v if v is not None else 0.0 for v in llrs], flag_set))
    parts.append(_token_row("probability", texts, [t.probability for t in record.tokens],
                            flag_set))
    if record.prompt_saliency is not None:
        method, qtokens, weights = record.prompt_saliency
        parts += [f"<h2>Prompt saliency over the question ({escape(method)})</h2>",
                  '<p class="legend">How much each question token steered the answer.</p>',
                  _token_row(f"{method} prompt saliency", qtokens, weights, kind="question")]
    parts += ["<h2>Heatmaps</h2>",
              f'<img class="overlay" alt="{escape("heatmaps of " + ", ".join(record.maps))}" '
              f'src="data:image/png;base64,{base64.b64encode(overlay_png).decode()}">']
    keys = sorted({k for t in record.tokens for k in t.weights})
    head = "".join(f"<th>{escape(k)}</th>" for k in keys)
    rows = []
    for t in record.tokens:
        status = ('<span class="badge">not supported</span>' if t.index in flag_set else
                  ("grounded" if t.grounded else "—"))
        cells = "".join(f'<td class="num">{_fmt(t.weights.get(k), 4)}</td>' for k in keys)
        rows.append(f"<tr><td class=num>{t.index}</td><td>{escape(clean_token(t.text))}</td>"
                    f'<td class="num">{_fmt(t.probability, 4)}</td>'
                    f'<td class="num">{_fmt(t.llr, 4)}</td><td>{status}</td>{cells}</tr>')
    parts += ["<h2>Per-token values</h2>",
              '<div class="scroll"><table><thead><tr><th>#</th><th>token</th>'
              "<th>probability</th><th>LLR (nats)</th>"
              f"<th>grounding</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>",
              "<h2>Settings used</h2>", _settings_html(record.settings),
              "<h2>Timings (s)</h2>", _kv_table({k: _fmt(v, 3) for k, v in
                                                record.timings.items()})]
    return _page(f"Audit {item_id}", "\n".join(parts))


def _settings_html(settings: dict[str, dict[str, Any]]) -> str:
    out = []
    for method, values in settings.items():
        out.append(f"<h3>{escape(method)}</h3>" + _kv_table(
            {k: json.dumps(v) if not isinstance(v, str) else v for k, v in values.items()}))
    return "".join(out) or "<p>none</p>"


def _kv_table(values: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(str(v))}</td></tr>"
                   for k, v in values.items())
    return f"<table><tbody>{rows}</tbody></table>"


SORT_JS = """
document.querySelectorAll('th[data-col]').forEach(function(th){th.style.cursor='pointer';
th.title='click to sort';th.addEventListener('click',function(){var t=th.closest('table'),
b=t.tBodies[0],c=+th.dataset.col,asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
var rows=[].slice.call(b.rows);rows.sort(function(x,y){var a=x.cells[c].dataset.v,
z=y.cells[c].dataset.v,na=parseFloat(a),nz=parseFloat(z),r=(!isNaN(na)&&!isNaN(nz))?na-nz:
String(a).localeCompare(String(z));return asc?r:-r;});rows.forEach(function(r){b.appendChild(r);});
});});
"""


def index_html(rows: Sequence[dict[str, Any]], stats: dict[str, Any]) -> str:
    """`rows` are summary rows, already sorted (ascending score, failures last)."""
    meta = [("Items", f"{stats['n_items']} ({stats['n_ok']} explained, "
                      f"{stats['n_errors']} failed)"),
            ("Ranked by", escape(stats.get("score_source") or "—")),
            ("Model", escape(stats.get("model") or "—")),
            ("Methods", escape(", ".join(stats.get("methods") or [])))]
    if stats.get("auroc") is not None:
        meta.append(("AUROC (correct vs corrupted)",
                     f"{stats['auroc']:.3f} <span class=legend>on {stats['auroc_n']} "
                     "labelled items; 1.0 = every corrupted answer scores below every correct "
                     "one</span>"))
    body = []
    for rank, r in enumerate(rows, 1):
        score = r.get("score")
        href = r.get("report")
        link = (f'<a href="{escape(href)}">{escape(r["id"])}</a>' if href else escape(r["id"]))
        thumb = (f'<a href="{escape(href)}"><img class="thumb" alt="heatmaps of '
                 f'{escape(r["id"])}" src="{escape(r["overlay"])}"></a>'
                 if r.get("overlay") else "")
        flagged = ", ".join(r.get("flagged_tokens") or [])
        marks = set(r.get("flagged_indices") or [])
        answer_html = (" ".join(
            f'<span class="atok flag" title="not supported by the image">{escape(t)}</span>'
            if i in marks else f'<span class="atok">{escape(t)}</span>'
            for i, t in enumerate(r["answer_tokens"])) if r.get("answer_tokens")
            else escape(r["answer"]))
        err = (f'<span class="err">{escape(r["error_kind"])}: {escape(r["error"])}</span>'
               if r.get("error") else "")
        sv = "" if score is None else f"{score:.6g}"
        body.append(
            f'<tr><td class="num" data-v="{rank}">{rank}</td><td data-v="{escape(r["id"])}">'
            f'{link}</td><td data-v="">{thumb}</td><td data-v="{escape(r["question"])}">'
            f'{escape(r["question"])}</td><td data-v="{escape(r["answer"])}">'
            f'{answer_html}</td><td class="num" data-v="{sv or "Infinity"}">'
            f'{escape(_fmt(score, 4))}</td><td data-v="{escape(flagged)}">{escape(flagged)}</td>'
            f'<td data-v="{escape(r.get("truth") or "")}">{escape(r.get("truth") or "")}</td>'
            f'<td data-v="{escape(r.get("error") or "")}">{err}</td></tr>')
    cols = ["#", "id", "heatmaps", "question", "answer", "score", "flagged tokens", "truth",
            "error"]
    head = "".join(f'<th data-col="{i}">{c}</th>' for i, c in enumerate(cols))
    content = ("<h1>Audit of flagged answers</h1>"
               '<dl class="meta">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in meta)
               + "</dl><p class=legend>Sorted by grounding score, lowest (least supported by "
               "the image) first; failed items last. Answer tokens flagged as not supported by "
               "the image are outlined in red. Click a row's id for its report. "
               "summary.csv and summary.json hold the same table.</p>"
               f"<table id=items><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody>"
               f"</table><script>{SORT_JS}</script>")
    return _page("Audit index", content)


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><meta name=\"viewport\" "
            "content=\"width=device-width, initial-scale=1\">"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")
