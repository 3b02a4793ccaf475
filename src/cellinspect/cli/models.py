"""`cellinspect models ...`: the versioned model store."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from cellinspect.cli import qa
from cellinspect.cli.common import console, store_root
from cellinspect.models.card import ModelCard, OperatingPoint, TradeOffPoint, ViewSet
from cellinspect.models.compare import GateMetric
from cellinspect.models.store import ModelStore, parse_model_ref

TRADE_OFF_ROWS = 8  # rows of the trade-off curve `show` prints

app = typer.Typer(
    help="List, inspect, evaluate, compare, promote and roll back published models.",
    no_args_is_help=True,
)
app.command("eval")(qa.evaluate)
app.command("compare")(qa.compare)
app.command("compare-live")(qa.compare_live_command)

StoreOption = typer.Option(None, "--store", help="Model store folder (default: HOME/store).")


def open_store(store: Path | None) -> ModelStore:
    return ModelStore(store_root(store))


@app.command("list")
def list_models(store: Path | None = StoreOption) -> None:
    """Every model with its versions and aliases."""
    summaries = open_store(store).list_models()
    if not summaries:
        console.print(f"no models in {store_root(store)}")
        return
    table = Table("name", "versions", "latest", "aliases")
    for s in summaries:
        aliases = ", ".join(f"{a}→{v}" for a, v in sorted(s.aliases.items())) or "-"
        table.add_row(s.name, ", ".join(s.versions), s.latest or "-", aliases)
    console.print(table)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def render_calibration(card: ModelCard) -> None:
    calib = card.calibration
    line = f"calibrated temperature {card.temperature:.4g}"
    if calib is not None:
        if calib.ece_before is not None and calib.ece_after is not None:
            line += f", top-label ECE {calib.ece_before:.4f} -> {calib.ece_after:.4f}"
        line += f" on {len(calib.labels)} validation images ({calib.data.manifest_hash[:12]})"
    else:
        line += " (no stored validation predictions)"
    console.print(line)


def render_operating_point(op: OperatingPoint) -> None:
    if op.review_low < op.scrap_threshold:
        bands = f"pass < {op.review_low:.4f} <= review < {op.scrap_threshold:.4f} <= scrap"
    else:
        bands = f"pass < {op.scrap_threshold:.4f} <= scrap (no review band)"
    console.print(f"decision   {bands}  (method: {op.method})")
    criteria = []
    if op.cost_ratio is not None:
        bayes = op.cost_ratio / (1 + op.cost_ratio)
        criteria.append(f"cost ratio {op.cost_ratio:g} (Bayes threshold {bayes:.4f})")
    if op.max_escape is not None:
        criteria.append(f"max escape {_pct(op.max_escape)}")
    if op.target_auto_accuracy is not None:
        criteria.append(f"target auto accuracy {_pct(op.target_auto_accuracy)}")
    if criteria:
        held = "" if op.confidence is None else f" (held at {op.confidence:g} confidence)"
        console.print(f"criteria   {', '.join(criteria)}{held}")
    if op.val_review_rate is not None:
        console.print(
            f"validation escape {_pct(op.val_escape_rate)}, "
            f"false scrap {_pct(op.val_false_scrap_rate)}, review {_pct(op.val_review_rate)}, "
            f"auto accuracy {_pct(op.val_auto_accuracy)}"
        )
    if op.confidence is not None and op.val_escape_bound is not None:
        console.print(
            f"promised   at {op.confidence:g} confidence: escape at most "
            f"{_pct(op.val_escape_bound)}, auto accuracy at least "
            f"{_pct(op.val_auto_accuracy_bound)}"
        )


def trade_off_table(curve: list[TradeOffPoint], rows: int = TRADE_OFF_ROWS) -> Table:
    """A few evenly spaced points of the stored curve, from no review to the most accurate."""
    table = Table("review", "auto accuracy", "pass <", "scrap >=", title="trade-off on validation")
    step = max(1, -(-(len(curve) - 1) // max(1, rows - 1)))  # ceil, so the last point fits
    picked = sorted({*range(0, len(curve), step), len(curve) - 1})
    for point in (curve[i] for i in picked):
        table.add_row(
            _pct(point.review_rate),
            _pct(point.auto_accuracy),
            f"{point.review_low:.4f}",
            f"{point.scrap_threshold:.4f}",
        )
    return table


def render_card(card: ModelCard) -> None:
    console.print(
        f"[bold]{card.name}@{card.version}[/]  {card.task.value}, {card.arch}, opset {card.opset}"
    )
    spec = card.preprocessing
    console.print(
        f"input      {card.input_name} N x {spec.channels} x {spec.height} x {spec.width} "
        f"({spec.resize.value}, mean {spec.mean}, std {spec.std})"
    )
    console.print(f"classes    {', '.join(card.class_names)}  (good: {card.good_class})")
    if card.heatmap is not None:
        console.print(f"heatmap    {card.heatmap.value}: {card.heatmap.description}")
    if card.test_time_views is not ViewSet.NONE:
        views = card.test_time_views
        console.print(
            f"views      {views.value}: {views.passes} averaged in the graph ({views.passes}x compute)"
        )
    render_calibration(card)
    render_operating_point(card.operating_point)
    if card.calibration and card.calibration.trade_off:
        console.print(trade_off_table(card.calibration.trade_off))
    if card.derived_from:
        console.print(f"derived    from {card.derived_from} (same ONNX file, new operating point)")
    if card.training_data:
        split = card.training_data.split
        console.print(
            f"trained on manifest {card.training_data.manifest_hash[:12]} "
            f"({card.training_data.count} images{f', {split}' if split else ''}), "
            f"commit {card.code_commit or 'unknown'}"
        )
    twin = card.training_config.get("calibrated_with")
    if twin:
        console.print(
            f"calibrated with {twin['run']} (epoch {twin['epoch'] + 1}, fitted on train): "
            "its validation predictions, as this model trained on them"
        )
    if card.quantization:
        p = card.parity
        console.print(
            f"quantized  {card.quantization}: top-1 agrees with the float model on "
            f"{p['agreement']:.2%} of {int(p['samples'])} validation images "
            f"(gate {p['agreement_gate']:.0%}, max |dP| {p['max_abs_prob_diff']:.3f}, "
            f"{int(p['calibration_samples'])} calibration images)"
            + (
                f"; {p['speed_vs_fp32']:.2f}x the FP32 speed where it was exported"
                if "speed_vs_fp32" in p
                else ""
            )
        )
    elif card.parity:
        console.print(
            f"parity     max |ORT - torch| {card.parity['max_abs_diff']:.1e} "
            f"on {int(card.parity['samples'])} samples (tolerance {card.parity['tolerance']:.0e})"
        )
    if card.metrics:
        table = Table("evaluation", "data", "images", "accuracy", "macro-F1")
        for key, m in card.metrics.items():
            table.add_row(
                key,
                m.data.manifest_hash[:12],
                str(m.data.count),
                f"{m.accuracy:.4f}",
                f"{m.macro_f1:.4f}",
            )
        console.print(table)
    console.print(f"onnx sha256 {card.onnx_sha256}\ncreated     {card.created.isoformat()}")


@app.command("show")
def show(
    ref: str = typer.Argument(..., help="NAME, NAME@VERSION or NAME@ALIAS."),
    store: Path | None = StoreOption,
    as_json: bool = typer.Option(False, "--json", help="Print card.json as stored."),
) -> None:
    """Print a model version's card (verifying the ONNX file's sha256)."""
    card, _ = open_store(store).load_verified(parse_model_ref(ref))
    if as_json:
        print(card.to_json(), end="")
    else:
        render_card(card)


@app.command("set-operating-point")
def set_operating_point(
    ref: str = typer.Argument(..., help="NAME@VERSION (or NAME@ALIAS) to start from."),
    cost_ratio: float | None = typer.Option(
        None,
        "--cost-ratio",
        help="Cost of scrapping a good cell / cost of a defect escaping: minimise expected cost.",
    ),
    max_escape: float | None = typer.Option(
        None, "--max-escape", help="Highest share of defective cells allowed to pass, 0..1."
    ),
    target_auto_accuracy: float | None = typer.Option(
        None,
        "--target-auto-accuracy",
        help="Accuracy required of cells decided without review, 0..1: adds a review band.",
    ),
    confidence: float | None = typer.Option(
        None,
        "--confidence",
        help="Hold --max-escape and --target-auto-accuracy at this one-sided confidence "
        "(e.g. 0.95, Clopper-Pearson bounds) instead of on the validation cells alone, "
        "which promise more than new cells keep when they are few.",
    ),
    store: Path | None = StoreOption,
) -> None:
    """Re-choose the thresholds from the version's stored validation predictions and publish
    them as a new version (same ONNX file). Options combine; aliases are not moved."""
    from cellinspect.models.calibration import publish_operating_point
    from cellinspect.models.card import OperatingCriteria

    criteria = OperatingCriteria(cost_ratio, max_escape, target_auto_accuracy, confidence)
    if not criteria.chooses:
        raise ValueError("give at least one of --cost-ratio, --max-escape, --target-auto-accuracy")
    card = publish_operating_point(open_store(store), parse_model_ref(ref), criteria)
    console.print(f"published {card.name}@{card.version} from {card.derived_from}")
    render_operating_point(card.operating_point)
    console.print(f"serve it with: cellinspect models promote {card.name} {card.version}")


@app.command("promote")
def promote(
    name: str = typer.Argument(...),
    version: str = typer.Argument(...),
    alias: str = typer.Option("production", help="Alias to move."),
    gate_on: str | None = typer.Option(
        None,
        "--gate-on",
        help="Frozen held-out set: first compare VERSION (B) with the version at the alias (A) "
        "there, and move the alias only if the gate passes (exit code 1 otherwise).",
    ),
    gate: GateMetric = typer.Option(
        GateMetric.ACCURACY, "--gate", help=f"Metric of the --gate-on check. {qa.GATE_HELP}"
    ),
    margin: float = qa.MarginOption,
    allow_overlap: bool = qa.AllowOverlapOption,
    store: Path | None = StoreOption,
) -> None:
    """Point an alias (default: production) at a version; the move is logged."""
    opened = open_store(store)
    ref = parse_model_ref(f"{name}@{version}")
    opened.load_verified(ref)  # never promote a broken file
    if gate_on is not None and not qa.gate_promotion(
        opened,
        name,
        opened.resolve(ref)[1],
        alias,
        heldout=gate_on,
        metric=gate,
        margin=margin,
        allow_overlap=allow_overlap,
    ):
        console.print(f"{name}: {alias} not moved (gate failed)")
        raise typer.Exit(code=1)
    opened.promote(name, version, alias=alias)
    console.print(f"{name}: {alias} → {version}")


@app.command("rollback")
def rollback(
    name: str = typer.Argument(...),
    alias: str = typer.Option("production", help="Alias to move back."),
    store: Path | None = StoreOption,
) -> None:
    """Move an alias back to where it pointed before its last move."""
    version = open_store(store).rollback(name, alias=alias)
    console.print(f"{name}: {alias} → {version} (rolled back)")
