"""`cellinspect models ...`: the versioned model store."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from cellinspect.cli.common import console, store_root
from cellinspect.models.card import ModelCard
from cellinspect.models.store import ModelStore, parse_model_ref

app = typer.Typer(
    help="List, inspect, promote and roll back published models.", no_args_is_help=True
)

StoreOption = typer.Option(None, "--store", help="Model store folder [default: HOME/store].")


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
    op = card.operating_point
    console.print(
        f"decision   temperature {card.temperature:g}; pass < {op.review_low:g} <= review "
        f"< {op.scrap_threshold:g} <= scrap  (method: {op.method})"
    )
    if card.training_data:
        console.print(
            f"trained on manifest {card.training_data.manifest_hash[:12]} "
            f"({card.training_data.count} images), commit {card.code_commit or 'unknown'}"
        )
    if card.parity:
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


@app.command("promote")
def promote(
    name: str = typer.Argument(...),
    version: str = typer.Argument(...),
    alias: str = typer.Option("production", help="Alias to move."),
    store: Path | None = StoreOption,
) -> None:
    """Point an alias (default: production) at a version; the move is logged."""
    opened = open_store(store)
    opened.load_verified(parse_model_ref(f"{name}@{version}"))  # never promote a broken file
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
