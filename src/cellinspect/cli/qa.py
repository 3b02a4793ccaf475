"""`cellinspect models eval|compare|compare-live` and the promotion gate: thin commands over
models.evaluate, models.compare, models.shadow and models.report."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import typer
from pydantic import TypeAdapter
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cellinspect.cli.common import console, home, store_root
from cellinspect.models.compare import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    GATE_HELP,
    CompareReport,
    GateMetric,
    compare_evaluations,
)
from cellinspect.models.evaluate import Evaluation, default_eval_dir, evaluate_model
from cellinspect.models.report import Table as RowTable
from cellinspect.models.report import (
    difference_table,
    headline_table,
    latency_table,
    verdict_change_table,
    write_compare_outputs,
    write_eval_outputs,
)
from cellinspect.models.shadow import LiveComparison, compare_live
from cellinspect.models.store import ModelStore, parse_model_ref

StoreOption = typer.Option(None, "--store", help="Model store folder (default: HOME/store).")
DataOption = typer.Option(
    ..., "--data", help="Frozen held-out set, by name (see `cellinspect data freeze`)."
)
AllowOverlapOption = typer.Option(
    False,
    "--allow-overlap",
    help="Evaluate even if the held-out set shares images with the model's training or "
    "validation data, or if that cannot be checked (the report says so).",
)
RerunOption = typer.Option(
    False, "--rerun", help="Ignore cached predictions: run inference and time the model again."
)
ThreadsOption = typer.Option(
    None, "--threads", min=1, help="ONNX Runtime intra-op threads (default: the cores available)."
)
GateOption = typer.Option(None, "--gate", help=f"Metric to gate on. {GATE_HELP}")
MarginOption = typer.Option(
    0.0, "--margin", min=0.0, help="Allowed loss on the gate metric, in its units."
)


@contextmanager
def _progress(description: str) -> Iterator[Progress]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeRemainingColumn(), console=console, transient=True) as bar:
        yield bar


def run_evaluations(
    store: ModelStore,
    refs: Sequence[str],
    heldout: str,
    *,
    allow_overlap: bool,
    rerun: bool,
    threads: int | None,
) -> list[Evaluation]:
    """Evaluate each ref (cached where possible) with a progress bar per model."""
    evaluations = []
    with _progress("evaluating") as bar:
        for ref in refs:
            task = bar.add_task(escape(ref), total=None)
            evaluations.append(
                evaluate_model(
                    store,
                    parse_model_ref(ref),
                    heldout,
                    heldout_root=home().heldout,
                    evals_root=home().evals,
                    allow_overlap=allow_overlap,
                    use_cache=not rerun,
                    threads=threads,
                    progress=lambda done, total, t=task: bar.update(t, completed=done, total=total),
                )
            )
            bar.remove_task(task)
    for ev in evaluations:
        r = ev.report
        source = "cached predictions" if r.cached else "evaluated now"
        console.print(f"{escape(ev.label)}: {r.heldout.count} images, {source}", highlight=False)
        if r.leakage.status != "clean":
            console.print(f"[yellow]leakage: {escape(r.leakage.message)}[/]", highlight=False)
    return evaluations


def _rich_table(table_rows: RowTable, title: str | None = None) -> Table:
    header, rows = table_rows
    table = Table(*header, title=title)
    for row in rows:
        table.add_row(*(escape(c) for c in row))
    return table


def evaluate(
    ref: str = typer.Argument(..., help="NAME, NAME@VERSION or NAME@ALIAS."),
    data: str = DataOption,
    out: Path | None = typer.Option(
        None, help="Output folder (default: HOME/evals/<name>@<version>__<held-out>)."
    ),
    allow_overlap: bool = AllowOverlapOption,
    rerun: bool = RerunOption,
    threads: int | None = ThreadsOption,
    store: Path | None = StoreOption,
) -> None:
    """Evaluate a stored version on a frozen held-out set with ONNX Runtime, as served.

    Writes eval.json, summary.md, predictions.csv and a self-contained report.html.
    """
    opened = ModelStore(store_root(store))
    (ev,) = run_evaluations(
        opened, [ref], data, allow_overlap=allow_overlap, rerun=rerun, threads=threads
    )
    console.print(_rich_table(headline_table([ev.report])))
    t = ev.report.throughput
    console.print(
        f"throughput {t.images_per_second:.1f} images/s (batch {t.batch_size}, {t.threads} "
        f"thread(s), {t.provider}, {t.host})"
    )
    folder = out or default_eval_dir(home().evals, ev)
    written = write_eval_outputs(ev, folder)
    console.print(f"wrote {', '.join(p.name for p in written)} to {folder}", highlight=False)


def print_comparison(report: CompareReport) -> None:
    console.print(_rich_table(headline_table(report.evals), title="figures"))
    console.print(_rich_table(latency_table(report.evals), title="latency"))
    for pair in report.pairs:
        header, rows, _ = difference_table(pair)
        title = f"{pair.challenger} vs {pair.baseline}"
        console.print(_rich_table((header, rows), title=title))
        console.print(_rich_table(verdict_change_table(pair)))
        m = pair.mcnemar
        console.print(
            f"McNemar (exact): {m.fixed} fixed, {m.broken} broken, p = {m.p_value:.4g}",
            highlight=False,
        )


def report_gate(report: CompareReport) -> bool:
    """Print each gate decision; True when every challenger passed."""
    for pair in report.pairs:
        if pair.gate is None:
            continue
        colour, word = ("green", "PASS") if pair.gate.passed else ("red", "FAIL")
        console.print(
            f"[bold {colour}]gate {word}[/] {escape(pair.challenger)} vs "
            f"{escape(pair.baseline)}: {escape(pair.gate.reason)}",
            highlight=False,
        )
    return report.gate_passed


def _compare_dir(report: CompareReport) -> Path:
    return home().evals / "compare" / ("__vs__".join(report.models) + f"__{report.heldout.name}")


def compare(
    refs: list[str] = typer.Argument(..., help="A B [C ...]: A is the baseline."),
    data: str = DataOption,
    gate: GateMetric | None = GateOption,
    margin: float = MarginOption,
    out: Path | None = typer.Option(
        None, help="Output folder (default: HOME/evals/compare/<A>__vs__<B>...__<held-out>)."
    ),
    resamples: int = typer.Option(BOOTSTRAP_RESAMPLES, min=100, help="Bootstrap resamples."),
    seed: int = typer.Option(BOOTSTRAP_SEED, min=0, help="Bootstrap seed."),
    allow_overlap: bool = AllowOverlapOption,
    rerun: bool = RerunOption,
    threads: int | None = ThreadsOption,
    store: Path | None = StoreOption,
) -> None:
    """Compare versions image by image on a frozen held-out set (exit code 1: gate failed).

    Paired bootstrap intervals of every figure's difference to A, an exact McNemar test,
    the images fixed and broken, verdict changes per 10,000 cells and latency.
    """
    if len(refs) < 2:
        raise ValueError("compare needs at least two models: A B [C ...]")
    opened = ModelStore(store_root(store))
    evaluations = run_evaluations(
        opened, refs, data, allow_overlap=allow_overlap, rerun=rerun, threads=threads
    )
    report = compare_evaluations(
        evaluations,
        gate=None if gate is None else (gate, margin),
        resamples=resamples,
        seed=seed,
    )
    print_comparison(report)
    folder = out or _compare_dir(report)
    written = write_compare_outputs(report, evaluations, folder)
    console.print(f"wrote {', '.join(p.name for p in written)} to {folder}", highlight=False)
    if not report_gate(report):
        raise typer.Exit(code=1)


def gate_promotion(
    store: ModelStore,
    name: str,
    version: str,
    alias: str,
    *,
    heldout: str,
    metric: GateMetric,
    margin: float,
    allow_overlap: bool,
) -> bool:
    """Gate `version` (a version number) against the version at `alias` on `heldout`;
    True when the alias may move (also when it points nowhere yet, or already there)."""
    current = store.aliases(name).get(alias)
    if current is None:
        console.print(f"{name}@{alias} points nowhere yet: nothing to gate against")
        return True
    if current == version:
        return True
    refs = [f"{name}@{current}", f"{name}@{version}"]
    evaluations = run_evaluations(
        store, refs, heldout, allow_overlap=allow_overlap, rerun=False, threads=None
    )
    report = compare_evaluations(evaluations, gate=(metric, margin))
    folder = _compare_dir(report)
    write_compare_outputs(report, evaluations, folder)
    console.print(f"comparison written to {folder}", highlight=False)
    return report_gate(report)


def _utc_time(text: str, option: str) -> datetime:
    """An ISO 8601 time as aware UTC (no offset given: UTC, as the records store it)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{option} {text!r} is not an ISO 8601 time (e.g. 2026-11-22T08:00:00Z)"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def print_live_comparison(c: LiveComparison) -> None:
    console.print(
        f"[bold]{escape(c.model)}@{escape(c.version)}[/] (served) vs "
        f"[bold]@{escape(c.candidate_version)}[/] (shadow candidate): {c.n} inspections",
        highlight=False,
    )
    console.print(
        f"label agreement {100 * c.label_agreement:.2f}%, "
        f"verdict agreement {100 * c.verdict_agreement:.2f}%",
        highlight=False,
    )
    verdicts = list(c.verdict_matrix)
    matrix = Table("served ↓ candidate →", *verdicts, title="verdicts (inspections)")
    for served, row in c.verdict_matrix.items():
        matrix.add_row(served, *(str(row[v]) for v in verdicts))
    console.print(matrix)
    rates = Table("per 10,000", "served", "candidate", "change")
    for v in verdicts:
        served, candidate = c.rates["served"][v], c.rates["candidate"][v]
        rates.add_row(v, f"{served:.2f}", f"{candidate:.2f}", f"{candidate - served:+.2f}")
    console.print(rates)
    changes = [f"{k} {rate:.2f}" for k, rate in c.changes.items() if rate]
    console.print(f"verdict changes per 10,000: {', '.join(changes) or 'none'}", highlight=False)
    t = c.scrap_test
    console.print(
        f"scrap sign test (exact): candidate scraps {t.more} the served model did not, "
        f"spares {t.fewer} it scrapped; p = {t.p_value:.4g}: [bold]{t.conclusion}[/]",
        highlight=False,
    )


def compare_live_command(
    name: str = typer.Argument(..., help="Served model name, as in CELLINSPECT_SHADOW_MODELS."),
    since: str = typer.Option(..., "--since", help="Start, ISO 8601, inclusive (no offset: UTC)."),
    until: str | None = typer.Option(
        None, "--until", help="End, ISO 8601, exclusive (default: now)."
    ),
    db: str | None = typer.Option(
        None,
        "--db",
        envvar="CELLINSPECT_DATABASE_URL",
        help="Records database URL (default: the service's, HOME/inspections.sqlite3).",
    ),
    json_out: Path | None = typer.Option(
        None, "--json", help="Also write the comparisons to this JSON file."
    ),
) -> None:
    """Served model vs its shadow candidate on live inspections (exit code 1: none found).

    Live images have no truth labels, so this says how the two differ, not which is right:
    label and verdict agreement, the verdict change matrix, rates and changes per 10,000
    inspections, and an exact sign test of whether the candidate scraps more or fewer cells.
    """
    from cellinspect.serving.records import open_existing

    start = _utc_time(since, "--since")
    end = _utc_time(until, "--until") if until is not None else datetime.now(UTC)
    if start >= end:
        raise ValueError(
            f"--since ({start.isoformat()}) must be before --until ({end.isoformat()})"
        )
    with open_existing(db or home().database_url) as records:
        tallies = records.shadow_tallies(name, since=start, until=end)
    comparisons = compare_live(name, tallies)
    if not comparisons:
        console.print(
            f"[yellow]no inspections of {escape(name)} with a shadow result between "
            f"{start.isoformat()} and {end.isoformat()}[/]",
            highlight=False,
        )
        raise typer.Exit(code=1)
    for comparison in comparisons:
        print_live_comparison(comparison)
    if json_out is not None:
        json_out.write_bytes(TypeAdapter(list[LiveComparison]).dump_json(comparisons, indent=2))
        console.print(f"wrote {json_out}", highlight=False)
