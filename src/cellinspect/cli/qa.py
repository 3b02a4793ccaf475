"""`cellinspect models eval|compare` and the promotion gate: thin commands over models.evaluate,
models.compare and models.report."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import typer
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
