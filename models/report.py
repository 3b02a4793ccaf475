"""Evaluation and comparison outputs: JSON, a markdown summary, CSV and self-contained HTML.

Every table is built once as rows and rendered to markdown and HTML; images are embedded as
base64 PNG, and the HTML loads nothing from anywhere else (no scripts, fonts or links).
"""

from __future__ import annotations

import csv
import html
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cellinspect.datasets.atomic import write_atomic
from cellinspect.models.compare import CompareReport, Flip, PairComparison
from cellinspect.models.evaluate import EvalReport, Evaluation
from cellinspect.models.plots import (
    MissingPlotSupportError,
    confusion_png,
    reliability_png,
    roc_pr_png,
    score_histograms_png,
    thumbnail,
)

logger = logging.getLogger(__name__)

GALLERY_SIZE = 24  # worst errors shown in report.html
FLIP_GALLERY_SIZE = 48  # per kind (fixed, broken) in compare.html; compare.json lists all

Table = tuple[list[str], list[list[str]]]  # header, rows

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f0f0; }
.better { background: #dff5e1; } .worse { background: #fbe0e0; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 150px; font-size: 12px; }
figure img { image-rendering: pixelated; max-width: 140px; border: 1px solid #999; }
.fail { color: #b00020; font-weight: bold; } .pass { color: #1b5e20; font-weight: bold; }
"""


def fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def fmt_signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.4f}"


# ---- tables ------------------------------------------------------------------------------


def headline_table(reports: Sequence[EvalReport]) -> Table:
    """Every figure, one column per model."""
    names = [f"{r.model.name}@{r.model.version}" for r in reports]
    flats = [r.figures.flat() for r in reports]
    return ["figure", *names], [[key, *(fmt(f.get(key)) for f in flats)] for key in flats[0]]


def per_class_table(report: EvalReport) -> Table:
    rows = [
        [name, fmt(c.precision), fmt(c.recall), fmt(c.f1), str(c.support)]
        for name, c in report.figures.per_class.items()
    ]
    return ["class", "precision", "recall", "F1", "images"], rows


def verdict_table(report: EvalReport) -> Table:
    counts = report.figures.verdicts.counts
    rows = [[truth, *(str(n) for n in by.values())] for truth, by in counts.items()]
    return ["truth \\ verdict", *next(iter(counts.values())).keys()], rows


def latency_table(reports: Sequence[EvalReport]) -> Table:
    rows = []
    for r in reports:
        t = r.throughput
        rows.append(
            [
                f"{r.model.name}@{r.model.version}",
                f"{t.images_per_second:.1f}",
                f"{1000 / t.images_per_second:.3g}" if t.images_per_second else "–",
                str(t.batch_size),
                str(t.threads),
                t.provider,
                t.host,
                t.measured.strftime("%Y-%m-%d %H:%M UTC"),
            ]
        )
    header = ["model", "images/s", "ms/image", "batch", "threads", "provider", "host", "measured"]
    return header, rows


def difference_table(pair: PairComparison) -> tuple[list[str], list[list[str]], list[str]]:
    """Rows of B - A with the interval, and a CSS class per row (better/worse/none)."""
    rows, classes = [], []
    for d in pair.differences:
        low, high = d.ci_low, d.ci_high
        css = ""
        direction = d.higher_is_better
        if direction is not None and low is not None and high is not None and (low > 0 or high < 0):
            css = "better" if (low > 0) == direction else "worse"  # the interval excludes 0
        rows.append(
            [
                d.figure,
                fmt(d.baseline),
                fmt(d.challenger),
                fmt_signed(d.diff),
                f"[{fmt_signed(low)}, {fmt_signed(high)}]",
            ]
        )
        classes.append(css)
    return ["figure", pair.baseline, pair.challenger, "B − A", "95% CI"], rows, classes


def verdict_change_table(pair: PairComparison) -> Table:
    v = pair.verdicts
    rows = [
        [k, f"{v.baseline[k]:.1f}", f"{v.challenger[k]:.1f}", f"{v.change[k]:+.1f}"]
        for k in v.change
    ]
    return ["per 10,000 cells", pair.baseline, pair.challenger, "change"], rows


# ---- rendering ---------------------------------------------------------------------------


def markdown_table(table: Table) -> str:
    header, rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def html_table(table: Table, row_classes: Sequence[str] = ()) -> str:
    header, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        css = row_classes[i] if i < len(row_classes) and row_classes[i] else ""
        attr = f' class="{css}"' if css else ""
        body.append(f"<tr{attr}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def img(data: str, alt: str) -> str:
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def page(title: str, body: Sequence[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def gallery(items: Sequence[tuple[str, str]]) -> str:
    """(image file path, caption) -> figures with embedded thumbnails."""
    figures = []
    for path, caption in items:
        data = thumbnail(path)
        picture = img(data, caption) if data else "<em>(file unreadable)</em>"
        name = html.escape(Path(path).name)
        figures.append(
            f"<figure>{picture}<figcaption>{html.escape(caption)}<br>{name}</figcaption></figure>"
        )
    return f'<div class="gallery">{"".join(figures)}</div>' if figures else "<p>none</p>"


# ---- one evaluation ----------------------------------------------------------------------


def worst_errors(ev: Evaluation, limit: int = GALLERY_SIZE) -> list[int]:
    """Wrongly classified images, most confident first."""
    confidence = ev.scored.probs.max(axis=1)
    wrong = np.flatnonzero(~ev.scored.correct)
    return sorted(wrong.tolist(), key=lambda i: -confidence[i])[:limit]


def _header_lines(r: EvalReport) -> list[str]:
    op = r.model.operating_point
    t = r.throughput
    return [
        f"held-out set {r.heldout.name} ({r.heldout.manifest_hash[:12]}, {r.heldout.count} images)",
        f"model onnx sha256 {r.model.onnx_sha256[:12]}, temperature {r.model.temperature:.4g}, "
        f"operating point: pass < {op.review_low:.4f} <= review < {op.scrap_threshold:.4f} "
        f"<= scrap ({op.method})",
        f"leakage check: {r.leakage.status.value}: {r.leakage.message}",
        f"throughput {t.images_per_second:.1f} images/s at batch {t.batch_size}, {t.threads} "
        f"thread(s), {t.provider} on {t.host} (median of {t.runs} runs)",
        "predictions from the cache (no inference run)" if r.cached else "predictions computed now",
    ]


def eval_summary_md(r: EvalReport) -> str:
    parts = [f"# {r.model.name}@{r.model.version} on {r.heldout.name}\n"]
    parts += [f"- {line}" for line in _header_lines(r)]
    parts += ["", markdown_table(headline_table([r])), markdown_table(per_class_table(r))]
    parts.append(markdown_table(verdict_table(r)))
    return "\n".join(parts)


def eval_html(ev: Evaluation) -> str:
    r = ev.report
    names = ev.card.class_names
    errors = [
        (
            ev.samples[i].path,
            f"true {ev.samples[i].label} → {names[ev.scored.predicted[i]]} "
            f"({ev.scored.probs[i].max():.3f})",
        )
        for i in worst_errors(ev)
    ]
    body = [
        f"<h1>{html.escape(ev.label)} on {html.escape(r.heldout.name)}</h1>",
        "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in _header_lines(r)) + "</ul>",
        "<h2>Figures</h2>",
        html_table(headline_table([r])),
        html_table(per_class_table(r)),
        "<h2>Verdicts at the card's operating point</h2>",
        html_table(verdict_table(r)),
        img(confusion_png(r.figures.confusion, names), "confusion matrix"),
        img(roc_pr_png([(ev.label, ev.scored)]), "ROC and precision-recall curves"),
        img(
            reliability_png(ev.scored, f"{ev.label}, T = {r.model.temperature:.3g}"),
            "reliability diagram",
        ),
        img(score_histograms_png(ev.scored, names, r.model.operating_point), "score histograms"),
        f"<h2>Worst errors ({len(errors)} most confident of "
        f"{int((~ev.scored.correct).sum())} wrong)</h2>",
        gallery(errors),
    ]
    return page(f"{ev.label} on {r.heldout.name}", body)


def predictions_csv(ev: Evaluation) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    names = ev.card.class_names
    writer.writerow(["path", "sha256", "truth", "predicted", "confidence", "defect_p", "verdict"])
    verdicts = ("pass", "review", "scrap")
    for i, s in enumerate(ev.samples):
        writer.writerow(
            [
                s.path,
                s.sha256,
                s.label,
                names[ev.scored.predicted[i]],
                f"{ev.scored.probs[i].max():.6f}",
                f"{ev.scored.defect_probability[i]:.6f}",
                verdicts[ev.scored.verdicts[i]],
            ]
        )
    return buffer.getvalue()


def write_eval_outputs(ev: Evaluation, out: Path) -> list[Path]:
    """eval.json, summary.md, predictions.csv and report.html (skipped without matplotlib)."""
    files = {
        "eval.json": ev.report.model_dump_json(indent=2) + "\n",
        "summary.md": eval_summary_md(ev.report),
        "predictions.csv": predictions_csv(ev),
    }
    try:
        files["report.html"] = eval_html(ev)
    except MissingPlotSupportError as exc:
        logger.warning("no report.html: %s", exc)
    return _write(out, files)


def _write(out: Path, files: dict[str, str]) -> list[Path]:
    paths = []
    for name, text in files.items():
        write_atomic(out / name, text, durable=False)
        os.chmod(out / name, 0o644)  # reports are for sharing; temp files are created 0600
        paths.append(out / name)
    return paths


# ---- comparisons -------------------------------------------------------------------------


def _gate_lines(report: CompareReport) -> list[str]:
    lines = []
    for pair in report.pairs:
        if pair.gate is not None:
            word = "PASS" if pair.gate.passed else "FAIL"
            lines.append(f"gate {word} {pair.challenger} vs {pair.baseline}: {pair.gate.reason}")
    return lines


def _mcnemar_line(pair: PairComparison) -> str:
    m = pair.mcnemar
    return (
        f"exact McNemar: {m.fixed} image(s) fixed, {m.broken} broken by {pair.challenger}, "
        f"p = {m.p_value:.4g}"
    )


def compare_summary_md(report: CompareReport) -> str:
    h = report.heldout
    parts = [f"# Comparison on {h.name} ({h.manifest_hash[:12]}, {h.count} images)\n"]
    parts.append(
        f"Paired bootstrap: {report.resamples} resamples, seed {report.seed}, "
        f"{100 * report.confidence:.0f}% intervals. Baseline: {report.models[0]}.\n"
    )
    parts += [f"- **{line}**" for line in _gate_lines(report)]
    parts += [
        "",
        markdown_table(headline_table(report.evals)),
        markdown_table(latency_table(report.evals)),
    ]
    for pair in report.pairs:
        header, rows, _ = difference_table(pair)
        parts.append(f"## {pair.challenger} vs {pair.baseline}\n")
        parts.append(f"- {_mcnemar_line(pair)}\n")
        parts += [markdown_table((header, rows)), markdown_table(verdict_change_table(pair))]
        for f in pair.flips:
            parts.append(
                f"- {f.kind}: {f.path} (true {f.truth}; {f.baseline_predicted} → "
                f"{f.challenger_predicted})"
            )
        parts.append("")
    return "\n".join(parts)


def _flip_items(flips: Sequence[Flip], kind: str) -> list[tuple[str, str]]:
    chosen = [f for f in flips if f.kind == kind][:FLIP_GALLERY_SIZE]
    return [
        (f.path, f"true {f.truth}: {f.baseline_predicted} → {f.challenger_predicted}")
        for f in chosen
    ]


def compare_html(report: CompareReport, evaluations: Sequence[Evaluation]) -> str:
    h = report.heldout
    body = [
        f"<h1>Comparison on {html.escape(h.name)}</h1>",
        f"<p>{h.count} images, manifest {html.escape(h.manifest_hash[:12])}; paired bootstrap "
        f"with {report.resamples} resamples (seed {report.seed}); baseline "
        f"{html.escape(report.models[0])}.</p>",
    ]
    for pair, line in zip(
        [p for p in report.pairs if p.gate is not None], _gate_lines(report), strict=True
    ):
        css = "pass" if pair.gate is not None and pair.gate.passed else "fail"
        body.append(f'<p class="{css}">{html.escape(line)}</p>')
    body += [
        "<h2>Figures</h2>",
        html_table(headline_table(report.evals)),
        "<h2>Latency</h2>",
        html_table(latency_table(report.evals)),
        img(roc_pr_png([(ev.label, ev.scored) for ev in evaluations]), "ROC and PR curves"),
    ]
    for pair in report.pairs:
        header, rows, classes = difference_table(pair)
        fixed, broken = _flip_items(pair.flips, "fixed"), _flip_items(pair.flips, "broken")
        body += [
            f"<h2>{html.escape(pair.challenger)} vs {html.escape(pair.baseline)}</h2>",
            f"<p>{html.escape(_mcnemar_line(pair))}</p>",
            html_table((header, rows), classes),
            html_table(verdict_change_table(pair)),
            f"<h3>Fixed by {html.escape(pair.challenger)} ({pair.mcnemar.fixed})</h3>",
            gallery(fixed),
            f"<h3>Broken by {html.escape(pair.challenger)} ({pair.mcnemar.broken})</h3>",
            gallery(broken),
        ]
    return page(f"Comparison on {h.name}", body)


def write_compare_outputs(
    report: CompareReport, evaluations: Sequence[Evaluation], out: Path
) -> list[Path]:
    """compare.json, summary.md and compare.html (skipped without matplotlib)."""
    files = {
        "compare.json": report.model_dump_json(indent=2) + "\n",
        "summary.md": compare_summary_md(report),
    }
    try:
        files["compare.html"] = compare_html(report, evaluations)
    except MissingPlotSupportError as exc:
        logger.warning("no compare.html: %s", exc)
    return _write(out, files)
