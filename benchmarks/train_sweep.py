"""Train recipe variants side by side, export each, and judge them on validation (and test).

    python benchmarks/train_sweep.py --data HOME/datasets/elpv-binary/manifest.json \\
        --recipe training/recipes/elpv.yaml --out /tmp/sweep --parallel 4 \\
        --variant base: --variant ema:ema_decay=0.995 \\
        --variant ema-soft:ema_decay=0.995,soft_label_key=probability

Each `--variant NAME:key=value,...` overrides the recipe's YAML (values parsed as YAML).
Runs go to OUT/NAME through `cellinspect train` (a subprocess each, `--parallel` at a time:
on a GPU box, several small runs share the card), are exported to OUT/store as NAME@1
with the recipe's operating point, and evaluated by ONNX Runtime through `models.predict`
(what the service runs). Choose by the validation columns: the test columns are the
held-out figures, to report, not to choose by. Writes OUT/summary.json and prints a table.
Binary tasks only (the figures of benchmarks/eval_elpv.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from eval_elpv import figures  # noqa: E402

from cellinspect.datasets.decode import read_image  # noqa: E402
from cellinspect.datasets.manifest import load_manifest  # noqa: E402
from cellinspect.models.predict import LoadedModel  # noqa: E402
from cellinspect.models.store import ModelStore  # noqa: E402
from cellinspect.training.export import export_run  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


def train(name: str, overrides: dict, args: argparse.Namespace) -> dict:
    run = args.out / name
    run.mkdir(parents=True, exist_ok=True)
    recipe = yaml.safe_load(args.recipe.read_text()) | overrides
    config = run / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    start = time.perf_counter()
    with open(run / "train.log", "w") as log:
        subprocess.run(
            [sys.executable, "-m", "cellinspect.cli", "train", "--data", str(args.data),
             "--out", str(run), "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, check=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    return {"name": name, "overrides": overrides, "train_s": time.perf_counter() - start}


def evaluate(result: dict, args: argparse.Namespace) -> dict:
    name = result["name"]
    store = ModelStore(args.out / "store")
    card = export_run(args.out / name, store=store, name=name)
    model = LoadedModel.load(store, f"{name}@{card.version}")
    samples = load_manifest(args.data).samples
    metrics = [json.loads(line) for line in (args.out / name / "metrics.jsonl").open()]
    best = max(metrics, key=lambda m: m["val_macro_f1"])
    row = {**result, "best_epoch": best["epoch"] + 1, "epochs": len(metrics)}
    for split in ("val", "test"):
        held = [s for s in samples if s.split == split]
        defect_p = 1.0 - model.predict([read_image(s.path) for s in held])[:, card.good_index]
        truth = np.array([s.label != card.good_class for s in held])
        verdicts = [card.operating_point.verdict(float(p)) for p in defect_p]
        row[split] = figures(defect_p, truth, verdicts)
        for kind in ("mono", "poly"):
            mine = np.array([s.metadata.get("type") == kind for s in held])
            row[split][f"accuracy_{kind}"] = float(((defect_p >= 0.5) == truth)[mine].mean())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="manifest.json")
    parser.add_argument("--recipe", type=Path, required=True, help="base training YAML")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", action="append", required=True, help="NAME:key=value,...")
    parser.add_argument("--parallel", type=int, default=1, help="runs trained at once")
    args = parser.parse_args()
    args.data = args.data.absolute()
    variants = [parse_variant(v) for v in args.variant]
    with ThreadPoolExecutor(args.parallel) as pool:
        trained = list(pool.map(lambda v: train(*v, args), variants))
    rows = [evaluate(result, args) for result in trained]
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2))
    print(
        f"{'variant':24s} {'train':>7s} {'best':>6s} {'val acc':>8s} {'val AUC':>8s} "
        f"{'test acc':>9s} {'AUC':>6s} {'F1':>6s} {'mono':>6s} {'poly':>6s} "
        f"{'review':>7s} {'auto acc':>8s}"
    )
    for r in rows:
        v, t = r["val"], r["test"]
        print(
            f"{r['name']:24s} {r['train_s'] / 60:6.1f}m {r['best_epoch']:3d}/{r['epochs']:<3d}"
            f"{v['accuracy']:8.4f} {v['roc_auc']:8.4f} {t['accuracy']:9.4f} {t['roc_auc']:6.4f} "
            f"{t['f1_defective']:6.4f} {t.get('accuracy_mono', float('nan')):6.4f} "
            f"{t.get('accuracy_poly', float('nan')):6.4f} {t['review_rate']:7.3f} "
            f"{t['auto_accuracy']:8.4f}"
        )


if __name__ == "__main__":
    main()
