"""Is INT8 worth it on a CPU edge box? FP32 vs INT8 images/s at the same threads and batch.

Compare the two versions `cellinspect export RUN --quantize int8` published (FP32 first, INT8
next), or two ONNX files. Sessions come from the service's factory (`create_session`, spinning
on, one inter-op thread); each cell is the median of --runs timed runs of about --run-seconds
each, after a warm-up, on the same random batch for both models. Prints Markdown tables; with
--manifest, both models are also scored on its test split (accuracy, macro-F1, agreement).

    python benchmarks/bench_int8.py --store cellinspect-home/store \\
        electrode-defects@1 electrode-defects@2 \\
        --manifest cellinspect-home/datasets/electrode-heldout/manifest.json
    python benchmarks/bench_int8.py --fp32-onnx fp32.onnx --int8-onnx int8.onnx \\
        --threads 1,2 --batch 1,8

Any two versions of one model compare the same way; --labels names them in the tables (e.g.
`--labels plain,flips` for an export without and with test-time views).

Only what a run measures, on the machine it ran on: compare rows from one run, and pin the
process (taskset) when other work shares the cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellinspect.datasets.decode import read_image
from cellinspect.datasets.manifest import load_manifest
from cellinspect.datasets.preprocess import PreprocessSpec, preprocess_batch
from cellinspect.datasets.samples import Split
from cellinspect.models.card import INPUT_NAME, LOGITS_NAME, DatasetRef
from cellinspect.models.metrics import evaluate_predictions
from cellinspect.models.predict import softmax
from cellinspect.models.runtime import create_session
from cellinspect.models.store import ModelStore


@dataclass(frozen=True)
class Contender:
    label: str  # "FP32" or "INT8", or --labels
    onnx_path: Path
    spec: PreprocessSpec
    class_names: list[str]


def from_onnx(label: str, path: Path) -> Contender:
    """Read the preprocessing and class names from the file's own metadata (export writes them)."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return Contender(
        label,
        path,
        PreprocessSpec.from_json(meta["cellinspect.preprocessing"]),
        json.loads(meta["cellinspect.class_names"]),
    )


def from_store(label: str, store: ModelStore, ref: str) -> Contender:
    card, path = store.load_verified(ref)
    return Contender(
        f"{label} {card.name}@{card.version}", path, card.preprocessing, card.class_names
    )


def without_heatmap(c: Contender, folder: Path) -> Contender:
    """The same model cut down to its logits and probabilities (onnx.utils.extract_model):
    ONNX Runtime runs every node of a graph, whichever outputs a call asks for."""
    import onnx.utils

    out = folder / f"{c.label.split()[0].lower()}-no-heatmap.onnx"
    onnx.utils.extract_model(
        str(c.onnx_path), str(out), [INPUT_NAME], [LOGITS_NAME, "probabilities"]
    )
    return Contender(f"{c.label} (no heatmap)", out, c.spec, c.class_names)


def images_per_s(session, batch: np.ndarray, runs: int, run_seconds: float) -> float:
    """Median images/s over `runs` timed runs of a fixed number of session calls."""
    feed = {INPUT_NAME: batch}
    session.run([LOGITS_NAME], feed)  # warm-up: allocations, first-run kernel choices
    start = time.perf_counter()
    session.run([LOGITS_NAME], feed)
    calls = max(1, round(run_seconds / max(time.perf_counter() - start, 1e-6)))
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            session.run([LOGITS_NAME], feed)
        rates.append(calls * len(batch) / (time.perf_counter() - start))
    return statistics.median(rates)


def speed_table(
    fp32: Contender, int8: Contender, threads: list[int], batches: list[int], args
) -> str:
    rng = np.random.default_rng(0)
    a, b = fp32.label.split()[0], int8.label.split()[0]
    rows = [
        f"| intra-op threads | batch | {a} images/s | {b} images/s | {b} / {a} |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in threads:
        sessions = [create_session(c.onnx_path, intra_op_threads=n) for c in (fp32, int8)]
        for b in batches:
            batch = rng.normal(0, 1, (b, *fp32.spec.input_shape)).astype(np.float32)
            f, q = (images_per_s(s, batch, args.runs, args.run_seconds) for s in sessions)
            rows.append(f"| {n} | {b} | {f:.1f} | {q:.1f} | {q / f:.2f}x |")
    return "\n".join(rows)


def accuracy_table(fp32: Contender, int8: Contender, manifest_path: Path, split: str) -> str:
    manifest = load_manifest(manifest_path)
    samples = [s for s in manifest.samples if split == "all" or s.split == split]
    if not samples:
        raise SystemExit(f"{manifest_path}: no samples in split {split!r}")
    index = {c: i for i, c in enumerate(fp32.class_names)}
    labels = np.array([index[s.label] for s in samples])
    data = DatasetRef(manifest_hash=manifest.hash, split=split, count=len(samples))
    top1 = {}
    rows = ["| model | images | accuracy | macro-F1 |", "| --- | ---: | ---: | ---: |"]
    for c in (fp32, int8):
        session = create_session(c.onnx_path)
        logits = np.concatenate(
            [
                session.run(
                    [LOGITS_NAME],
                    {
                        INPUT_NAME: preprocess_batch(
                            [read_image(s.path) for s in samples[i : i + 32]], c.spec
                        )
                    },
                )[0]
                for i in range(0, len(samples), 32)
            ]
        )
        top1[c.label] = logits.argmax(axis=1)
        m = evaluate_predictions(labels, softmax(logits), c.class_names, data)
        rows.append(f"| {c.label} | {len(samples)} | {m.accuracy:.4f} | {m.macro_f1:.4f} |")
    same = float(np.mean(top1[fp32.label] == top1[int8.label]))
    a, b = fp32.label.split()[0], int8.label.split()[0]
    return "\n".join(rows) + f"\n\nTop-1 agreement {b} vs {a} on {split}: {same:.2%}"


def cpu_line() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "?"
    )
    vnni = "avx512_vnni" in info or "avx_vnni" in info
    return f"{name} ({'VNNI' if vnni else 'no VNNI'})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("refs", nargs="*", help="FP32_REF INT8_REF in --store (name@version)")
    parser.add_argument("--store", type=Path, default=Path("cellinspect-home/store"))
    parser.add_argument("--fp32-onnx", type=Path, help="instead of refs: an FP32 ONNX file")
    parser.add_argument("--int8-onnx", type=Path, help="instead of refs: its INT8 ONNX file")
    parser.add_argument("--threads", default="1,2", help="ORT intra-op threads to compare")
    parser.add_argument("--batch", default="1,8", help="batch sizes to compare")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per cell (median)")
    parser.add_argument("--run-seconds", type=float, default=1.0, help="length of one run")
    parser.add_argument("--manifest", type=Path, help="also score both on this manifest's split")
    parser.add_argument("--split", default=Split.TEST.value, help="test, val, train or all")
    parser.add_argument("--labels", default="FP32,INT8", help="names of the two models")
    parser.add_argument(
        "--without-heatmap", action="store_true", help="time both without the heatmap output"
    )
    args = parser.parse_args()

    labels = args.labels.split(",")
    if len(set(labels)) != 2 or not all(label.strip() and " " not in label for label in labels):
        parser.error("--labels takes two different names without spaces, e.g. FP32,INT8")
    if args.fp32_onnx and args.int8_onnx and not args.refs:
        fp32, int8 = from_onnx(labels[0], args.fp32_onnx), from_onnx(labels[1], args.int8_onnx)
    elif len(args.refs) == 2 and not (args.fp32_onnx or args.int8_onnx):
        store = ModelStore(args.store)
        fp32, int8 = (
            from_store(labels[0], store, args.refs[0]),
            from_store(labels[1], store, args.refs[1]),
        )
    else:
        parser.error("give FP32_REF INT8_REF, or --fp32-onnx and --int8-onnx")
    if fp32.spec != int8.spec or fp32.class_names != int8.class_names:
        parser.error("the two models differ in preprocessing or classes: not one model")

    if args.without_heatmap:
        folder = Path(tempfile.mkdtemp(prefix="bench-int8-"))
        fp32, int8 = without_heatmap(fp32, folder), without_heatmap(int8, folder)
    threads = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    print(f"## {labels[0]} vs {labels[1]} on {cpu_line()}\n")
    print(f"{fp32.label}: {fp32.onnx_path} ({fp32.onnx_path.stat().st_size / 1e6:.1f} MB)")
    print(f"{int8.label}: {int8.onnx_path} ({int8.onnx_path.stat().st_size / 1e6:.1f} MB)")
    print(f"input N x {' x '.join(map(str, fp32.spec.input_shape))}, median of {args.runs} runs\n")
    print(speed_table(fp32, int8, threads, batches, args))
    if args.manifest:
        print()
        print(accuracy_table(fp32, int8, args.manifest, args.split))


if __name__ == "__main__":
    main()
