"""`cellinspect train`, `export` and `demo`: the ML engineer's path from data to a published model.

torch is imported inside the commands, so `cellinspect models ...` works on a serving-only install.
"""

from __future__ import annotations

import time
from datetime import datetime
from enum import StrEnum
from pathlib import Path

import typer
from rich.markup import escape

from cellinspect.cli.common import console, err_console, home, store_root
from cellinspect.datasets.synth import SynthKind
from cellinspect.models.card import ViewSet
from cellinspect.training.choices import ExportCheckpoint, FitSplits

DEMO_MODEL = "electrode-defects"


class Quantize(StrEnum):
    """What `export` publishes beside the float model."""

    NONE = "none"  # the FP32 model only
    INT8 = "int8"  # also a static INT8 version (QDQ, S8S8) for CPU edge boxes


def _run_dir_default() -> Path:
    return home().runs / datetime.now().strftime("%Y%m%d-%H%M%S")


def train(
    data: Path = typer.Option(..., help="Data folder, manifest.json or CSV file."),
    out: Path | None = typer.Option(None, help="Run folder (default: HOME/runs/<time>)."),
    config: Path | None = typer.Option(None, "--config", help="YAML file of training options."),
    arch: str | None = typer.Option(
        None,
        help="resnet18, resnet18_half, resnet34, resnet50, mobilenet_v3_small, "
        "mobilenet_v3_large or efficientnet_b0.",
    ),
    epochs: int | None = typer.Option(None, min=1, help="Maximum epochs [15]."),
    img_size: str | None = typer.Option(None, help="Input size: 128 or HxW like 128x256 [128]."),
    batch_size: int | None = typer.Option(None, min=1, help="Batch size [32]."),
    lr: float | None = typer.Option(None, help="Peak learning rate [2e-3]."),
    workers: int | None = typer.Option(
        None, min=0, help="DataLoader worker processes [cores - 2, at most 8]."
    ),
    weights: Path | None = typer.Option(None, help="Local pretrained weights (never downloaded)."),
    device: str | None = typer.Option(None, help="auto, cpu or cuda[:N] [auto]."),
    seed: int | None = typer.Option(None, help="Training seed [0]."),
    fit_on: FitSplits | None = typer.Option(
        None,
        help="train: hold the validation split out (it picks epochs and fits the temperature "
        "and operating point at export); train+val: refit the fixed recipe on the validation "
        "images too, nothing validated, exported with --calibrate-with a twin run fitted on "
        "train [train].",
    ),
    skip_bad: bool | None = typer.Option(
        None, "--skip-bad/--no-skip-bad", help="Skip unreadable images."
    ),
) -> None:
    """Train a defect classifier; resumes when OUT already holds a checkpoint.

    Precedence: defaults < --config YAML < flags. The resolved config is saved in OUT.
    """
    from cellinspect.training.config import resolve_config
    from cellinspect.training.fit import fit

    cfg = resolve_config(
        yaml_path=config,
        overrides={
            "data": str(data),
            "out": str(out or _run_dir_default()),
            "arch": arch,
            "epochs": epochs,
            "img_size": img_size,
            "batch_size": batch_size,
            "lr": lr,
            "workers": workers,
            "weights": None if weights is None else str(weights),
            "device": device,
            "seed": seed,
            "fit_on": fit_on,
            "skip_bad": skip_bad,
        },
    )
    result = fit(cfg)
    ran = (
        f"{result.epochs_run} epoch(s) run{', stopped early' if result.stopped_early else ''}; "
        f"{result.train_images_per_s:.0f} img/s"
    )
    if cfg.fit_on is FitSplits.TRAIN_VAL:
        console.print(
            f"run {result.run_dir}: fitted on train+val, nothing validated ({ran}); export it "
            "with --calibrate-with a run of the same recipe fitted on train"
        )
        return
    console.print(
        f"run {result.run_dir}: best validation macro-F1 {result.best_val_macro_f1:.4f} "
        f"at epoch {result.best_epoch + 1} ({ran})"
    )


def export(
    run_dir: Path = typer.Argument(..., help="A training run folder (holds best.pt, last.pt)."),
    name: str = typer.Option(..., help="Model name in the store (lower case, digits, . _ -)."),
    heldout: Path | None = typer.Option(None, help="Manifest of a held-out set to evaluate on."),
    store: Path | None = typer.Option(None, help="Model store (default: HOME/store)."),
    quantize: Quantize = typer.Option(
        Quantize.NONE,
        help="int8: also publish a static INT8 version (QDQ, signed int8, per-channel weights, "
        "calibrated on training images) as the next version. Refused, and nothing published, "
        "unless its top-1 agrees with the FP32 model on at least 99% of the validation split.",
    ),
    views: ViewSet | None = typer.Option(
        None,
        help="Test-time views averaged inside the ONNX graph: none; flips (4 views: mirrors "
        "and 180 degrees, any aspect ratio); isotropic (8 views: also quarter turns, square "
        "inputs only). Each view costs one more forward pass per image. Default: the "
        "training config's test_time_views (none if it has none).",
        case_sensitive=False,
    ),
    checkpoint: ExportCheckpoint | None = typer.Option(
        None,
        help="best: the epoch with the best validation macro-F1 (best.pt); last: the final "
        "epoch (last.pt), so that no epoch is picked on the validation split that the "
        "temperature and operating point are then fitted on. Default: the training "
        "config's export_checkpoint (best if it has none).",
        case_sensitive=False,
    ),
    calibrate_with: Path | None = typer.Option(
        None,
        help="For a run fitted on train+val (its validation images are training images): a "
        "twin run of the same recipe and data fitted on train alone, whose validation "
        "predictions (same checkpoint choice and views) fit the temperature and operating "
        "point. Not with --quantize: such a run has no INT8 export.",
    ),
    score_test: bool = typer.Option(
        True,
        "--test/--no-test",
        help="Score the test split too (the card's test metrics). --no-test leaves it unread, "
        "for exports that screen variants on validation before the final figures.",
    ),
) -> None:
    """Export to ONNX, check parity with PyTorch, evaluate with ONNX Runtime, publish a version.

    With --quantize int8, the FP32 version is followed by an INT8 one, evaluated alike.
    """
    from cellinspect.cli.models import render_card
    from cellinspect.models.store import ModelStore, parse_model_ref
    from cellinspect.training.export import export_run

    parse_model_ref(name)  # refuse a bad name before minutes of work
    if quantize is not Quantize.NONE and calibrate_with is not None:
        raise ValueError(
            "--calibrate-with is for runs fitted on train+val, which have no INT8 export "
            "(their INT8 gate would run on training images); drop --quantize"
        )
    # The same export either way; --quantize int8 adds a second version after it.
    options = {
        "store": ModelStore(store_root(store)),
        "name": name,
        "heldout": heldout,
        "views": views,
        "score_test": score_test,
        "checkpoint": checkpoint,
    }
    if quantize is Quantize.NONE:
        card = export_run(run_dir, calibrate_with=calibrate_with, **options)
        console.print(f"published {card.name}@{card.version} (sha256 {card.onnx_sha256[:12]})")
        render_card(card)
        return

    from cellinspect.training.quantize import QuantizationGateError, export_int8

    try:
        fp32, card = export_int8(run_dir, **options)
    except QuantizationGateError as exc:
        err_console.print(f"[bold red]refused:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from exc
    console.print(
        f"published {fp32.name}@{fp32.version} (fp32) and {card.name}@{card.version} "
        f"({card.quantization}, top-1 agreement {card.parity['agreement']:.2%})"
    )
    render_card(card)


def demo(
    count: int = typer.Option(300, min=10, help="Synthetic training images per class."),
    heldout_count: int = typer.Option(100, min=5, help="Held-out images per class (fresh seed)."),
    epochs: int = typer.Option(18, min=1, help="Maximum training epochs."),
    img_size: int = typer.Option(128, min=32, help="Model input side."),
    workers: int = typer.Option(2, min=1, help="Generator processes."),
    serve: bool = typer.Option(
        True, "--serve/--no-serve", help="Then serve the model and run a simulated camera."
    ),
    port: int = typer.Option(8000, min=1, max=65535, help="Service port when serving."),
) -> None:
    """The main job end to end on embedded defaults: synthesize, train, export, publish, serve."""
    from cellinspect.cli.data import synthesize
    from cellinspect.cli.models import render_card
    from cellinspect.models.store import ModelStore
    from cellinspect.training.config import TrainConfig
    from cellinspect.training.export import export_run
    from cellinspect.training.fit import fit

    h = home()
    console.print(f"[bold]cellinspect demo[/] — home {h.root}")
    t0 = time.perf_counter()
    train_dir, heldout_dir = h.datasets / "electrode-demo", h.datasets / "electrode-heldout"
    synthesize(SynthKind.ELECTRODE, train_dir, count=count, seed=0, size=img_size, workers=workers)
    # A fresh seed the training never sees: the held-out figure is an honest one.
    synthesize(
        SynthKind.ELECTRODE,
        heldout_dir,
        count=heldout_count,
        seed=1001,
        size=img_size,
        workers=workers,
    )
    console.print(
        f"1/3 data: {train_dir}, held-out {heldout_dir} ({time.perf_counter() - t0:.0f}s)"
    )

    cfg = TrainConfig(
        data=str(train_dir), out=str(_run_dir_default()), epochs=epochs, img_size=img_size
    )
    result = fit(cfg)
    console.print(
        f"2/3 trained {cfg.arch.value}: validation macro-F1 {result.best_val_macro_f1:.4f} "
        f"({time.perf_counter() - t0:.0f}s)"
    )
    store = ModelStore(h.store)
    card = export_run(
        result.run_dir, store=store, name=DEMO_MODEL, heldout=heldout_dir / "manifest.json"
    )
    store.set_alias(DEMO_MODEL, "staging", card.version)
    console.print(
        f"3/3 published {card.name}@{card.version} → staging ({time.perf_counter() - t0:.0f}s)"
    )
    render_card(card)
    if serve:
        serve_with_camera(f"{card.name}@{card.version}", port)


def serve_with_camera(ref: str, port: int, *, keep_serving: bool = True) -> None:
    """Start the service on loopback, post simulated camera images, then keep serving
    (until Ctrl-C; with `keep_serving=False`, stop once the camera is done)."""
    import subprocess
    import sys
    import urllib.request

    from cellinspect.cli.serve import camera

    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "cellinspect.cli", "serve", "--model", ref, "--port", str(port)]
    )
    try:
        for _ in range(600):
            if server.poll() is not None:
                raise ValueError(
                    f"the service exited with code {server.returncode} (port {port} busy?)"
                )
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=1) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        console.print(f"[bold]service up at {url}[/] ({ref}); a simulated camera posts 20 tiles:")
        camera(
            url=url,
            rate=10.0,
            count=20,
            line_id="demo-line",
            station_id="coater-1",
            api_key=None,
            seed=4242,
            size=128,
            retries=3,
        )
        if keep_serving:
            console.print(
                f"service still running at {url} (API docs at {url}/docs); Ctrl-C stops it"
            )
            server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.terminate()
        server.wait(timeout=30)
