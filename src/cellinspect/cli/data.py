"""`cellinspect data ...`: synthetic data sets, the public ELPV set and manifests."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from cellinspect.cli.common import console, home
from cellinspect.datasets.adapters import DataFormat, load_samples
from cellinspect.datasets.elpv import (
    ElpvTask,
    materialise_elpv,
    split_breakdown,
)
from cellinspect.datasets.heldout import freeze_heldout, list_heldout
from cellinspect.datasets.manifest import Manifest, build_manifest, write_manifest
from cellinspect.datasets.synth import SynthKind, write_synthetic

app = typer.Typer(
    help="Generate synthetic data sets, materialise ELPV, build manifests, freeze held-out sets.",
    no_args_is_help=True,
)


def synthesize(
    kind: SynthKind, out: Path, *, count: int, seed: int, size: int | None, workers: int
) -> Manifest | None:
    """Write a synthetic data set; electrode/cell sets also get manifest.json (hashes + split)."""
    samples = write_synthetic(kind, out, count=count, seed=seed, size=size, workers=workers)
    if kind is SynthKind.FRAME:
        return None
    for sample in samples:  # manifests list files relative to themselves; adapters use absolute
        sample.path = str(out / sample.path)
        if "mask" in sample.metadata:
            sample.metadata["mask"] = str(out / sample.metadata["mask"])
    manifest = build_manifest(samples, out=out / "manifest.json", seed=seed)
    write_manifest(manifest, out / "manifest.json")
    return manifest


@app.command("synth")
def synth(
    kind: SynthKind = typer.Argument(
        ..., help="electrode tiles, cell side views, or line-scan frames"
    ),
    out: Path | None = typer.Option(
        None, help="Output folder (default: HOME/datasets/<kind>-<seed>)"
    ),
    count: int = typer.Option(200, min=1, help="Images per class (frames for 'frame')."),
    seed: int = typer.Option(0, help="Seed: the same seed gives the same images."),
    size: int | None = typer.Option(None, help="Tile side (electrode) or cell image height."),
    workers: int = typer.Option(2, min=1, help="Generator processes."),
) -> None:
    """Generate a synthetic data set with defect masks (and a manifest with a split)."""
    out = out or home().datasets / f"{kind.value}-{seed}"
    start = time.perf_counter()
    manifest = synthesize(kind, out, count=count, seed=seed, size=size, workers=workers)
    seconds = time.perf_counter() - start
    if manifest is None:
        console.print(f"wrote {count} frame(s) with ground truth to {out} in {seconds:.1f}s")
        return
    console.print(
        f"wrote {len(manifest.samples)} images ({len(manifest.classes)} classes) to {out} "
        f"in {seconds:.1f}s; manifest {manifest.hash[:12]} at {out / 'manifest.json'}"
    )


@app.command("elpv")
def elpv(
    out: Path | None = typer.Option(
        None, help="Output folder (default: HOME/datasets/elpv-<task>)"
    ),
    task: ElpvTask = typer.Option(
        ElpvTask.BINARY,
        help="binary: functional/defective (defective = probability > 0.5); "
        "four-level: one class per expert probability (p0, p33, p67, p100).",
    ),
    seed: int = typer.Option(0, min=0, help="Seed of the split: the same seed, the same split."),
) -> None:
    """Materialise the ELPV solar cells (pip package elpv-dataset) with the paper's split.

    75% train / 25% test, stratified by (probability, cell type); validation is 15% of all,
    taken from the training share. The test quarter is the same for both tasks.
    """
    out = out or home().datasets / f"elpv-{task.value}"
    start = time.perf_counter()
    built = materialise_elpv(out, task, seed=seed)
    seconds = time.perf_counter() - start
    console.print(
        f"wrote {len(built.samples)} ELPV images ({task.value}, good class "
        f"'{task.good_class}') to {out} in {seconds:.1f}s; manifest {built.hash[:12]} at "
        f"{out / 'manifest.json'}"
    )
    rows = split_breakdown(built, task.classes)
    table = Table("split", *next(iter(rows.values())).keys())
    for split_name, counts in rows.items():
        table.add_row(split_name, *(str(n) for n in counts.values()))
    console.print(table)
    console.print("ELPV images are CC BY-NC-SA 4.0: non-commercial use, do not commit them.")


@app.command("manifest")
def manifest(
    source: Path = typer.Argument(..., help="Data folder (ImageFolder or MVTec AD) or CSV file."),
    out: Path = typer.Option(..., help="Manifest JSON file to write."),
    fmt: DataFormat = typer.Option(DataFormat.AUTO, "--format", help="Layout of SOURCE."),
    seed: int = typer.Option(0, help="Seed of the stratified split."),
    val: float = typer.Option(0.15, min=0.0, max=0.9, help="Validation fraction."),
    test: float = typer.Option(0.15, min=0.0, max=0.9, help="Test fraction."),
    skip_bad: bool = typer.Option(
        False, help="Skip unreadable files (counted) instead of failing."
    ),
) -> None:
    """Hash every file and write a manifest with a deterministic stratified split."""
    result = load_samples(source, fmt, skip_bad=skip_bad)
    built = build_manifest(
        result.samples, out=out, seed=seed, val=val, test=test, skipped=result.skipped
    )
    write_manifest(built, out)
    counts = ", ".join(f"{k}: {sum(v.values())}" for k, v in built.split_counts.items())
    console.print(f"manifest {built.hash[:12]}: {len(built.samples)} images ({counts}) -> {out}")
    if result.skipped:
        console.print(f"[yellow]skipped {len(result.skipped)} bad file(s)[/]:")
        for path, problem in result.skipped[:20]:
            console.print(f"  {path}: {problem}", highlight=False)


@app.command("freeze")
def freeze(
    manifest_path: Path = typer.Argument(..., metavar="MANIFEST", help="Manifest JSON file."),
    name: str = typer.Option(..., "--name", help="Name evaluations will use for this set."),
) -> None:
    """Register a manifest as a frozen held-out set (HOME/heldout/NAME.json).

    Every file is hashed now and again before each evaluation; a missing or changed file
    is refused. A name cannot be re-frozen with different data.
    """
    entry, created = freeze_heldout(manifest_path, name, root=home().heldout)
    counts = ", ".join(f"{k}: {v}" for k, v in entry.class_counts.items())
    state = "froze" if created else "already frozen:"
    console.print(
        f"{state} held-out set {entry.name!r} = manifest {entry.manifest_hash[:12]} "
        f"({entry.count} images; {counts}) from {entry.manifest}",
        highlight=False,
    )


@app.command("heldout")
def heldout() -> None:
    """List the frozen held-out sets."""
    entries = list_heldout(home().heldout)
    if not entries:
        console.print(f"no held-out sets in {home().heldout}")
        return
    table = Table("name", "manifest hash", "images", "frozen", "manifest")
    for e in entries:
        table.add_row(
            e.name, e.manifest_hash[:12], str(e.count), e.frozen.strftime("%Y-%m-%d"), e.manifest
        )
    console.print(table)
