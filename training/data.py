"""From a data source to PyTorch datasets, through the preprocessing contract.

Images are decoded and `prepare()`d once, in a thread pool, into one contiguous array:
on a 2-core machine, decoding PNGs every epoch would starve the model. Workers only
augment and normalise, and share the array copy-on-write after fork.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cellinspect.datasets.adapters import load_samples
from cellinspect.datasets.decode import read_image
from cellinspect.datasets.manifest import Manifest, build_manifest, load_manifest, write_manifest
from cellinspect.datasets.preprocess import PreprocessSpec, normalize, prepare
from cellinspect.datasets.samples import Sample, Split
from cellinspect.datasets.synth.el_cracks import paint_el_cracks
from cellinspect.training.choices import FitSplits
from cellinspect.training.config import TrainConfig

log = logging.getLogger(__name__)

GOOD_CLASS_NAMES = ("ok", "good", "pass", "normal", "functional")  # functional: ELPV binary


@dataclass
class TrainingData:
    """The resolved data of one run: its manifest, classes and the samples of each split
    as the run uses them (fitted on train+val: validation moved into train, none left)."""

    manifest: Manifest
    manifest_path: Path
    class_names: list[str]
    good_class: str
    splits: dict[Split, list[Sample]]

    def labels(self, split: Split) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.class_names)}
        return np.array([index[s.label] for s in self.splits[split]], dtype=np.int64)

    def soft_targets(self, split: Split, key: str) -> np.ndarray:
        """Class-probability targets (N x 2) from each sample's `metadata[key]`, the probability
        that the image is defective (e.g. ELPV's expert grades 0, 1/3, 2/3, 1): binary tasks
        only. The hard label must agree with it (defective iff probability > 0.5)."""
        if len(self.class_names) != 2:
            raise ValueError(
                f"{self.manifest_path}: soft_label_key needs two classes (good and defective), "
                f"not {len(self.class_names)}"
            )
        good = self.class_names.index(self.good_class)
        targets = np.empty((len(self.splits[split]), 2), dtype=np.float32)
        for row, sample in enumerate(self.splits[split]):
            raw = sample.metadata.get(key)
            try:
                p = float(raw)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{sample.path}: metadata {key!r} is {raw!r}, not a defect probability"
                ) from None
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{sample.path}: metadata {key!r} = {p} is outside [0, 1]")
            if (p > 0.5) != (sample.label != self.good_class):
                raise ValueError(
                    f"{sample.path}: label {sample.label!r} disagrees with {key!r} = {p} "
                    f"(defective iff > 0.5)"
                )
            targets[row, good], targets[row, 1 - good] = 1.0 - p, p
        return targets


def resolve_manifest(cfg: TrainConfig) -> tuple[Manifest, Path]:
    """Use the source's manifest, or build one (hashes + stratified split) into the run dir."""
    source = Path(cfg.data)
    if source.is_file() and source.suffix == ".json":
        return load_manifest(source), source
    if source.is_dir() and (source / "manifest.json").is_file():
        return load_manifest(source / "manifest.json"), source / "manifest.json"
    result = load_samples(source, skip_bad=cfg.skip_bad)
    if result.skipped:
        log.warning("skipped %d unreadable file(s) in %s", len(result.skipped), source)
    out = cfg.run_dir / "manifest.json"
    manifest = build_manifest(
        result.samples,
        out=out,
        seed=cfg.split_seed,
        val=cfg.val_fraction,
        test=cfg.test_fraction,
        skipped=result.skipped,
    )
    write_manifest(manifest, out)
    return load_manifest(out), out


def choose_good_class(class_names: list[str], requested: str | None) -> str:
    if requested is not None:
        if requested not in class_names:
            raise ValueError(f"good_class {requested!r} is not a class of the data: {class_names}")
        return requested
    for name in GOOD_CLASS_NAMES:
        if name in class_names:
            return name
    raise ValueError(
        f"none of the classes {class_names} is a known 'no defect' name "
        f"({', '.join(GOOD_CLASS_NAMES)}); set good_class in the config"
    )


def load_training_data(cfg: TrainConfig) -> TrainingData:
    manifest, path = resolve_manifest(cfg)
    splits = {split: [s for s in manifest.samples if s.split == split] for split in Split}
    for split in (Split.TRAIN, Split.VAL):
        if not splits[split]:
            raise ValueError(f"{path}: the {split.value} split is empty")
    if cfg.fit_on is FitSplits.TRAIN_VAL:  # nothing held out: the fit loop validates nothing
        splits[Split.TRAIN] = [s for split in cfg.fit_on.splits for s in splits[split]]
        splits[Split.VAL] = []
    class_names = list(manifest.classes)
    return TrainingData(
        manifest=manifest,
        manifest_path=path,
        class_names=class_names,
        good_class=choose_good_class(class_names, cfg.good_class),
        splits=splits,
    )


def infer_channels(sample: Sample, max_pixels: int) -> int:
    """1 for gray data, 3 for colour: looked up on the first image."""
    image = read_image(sample.path, max_pixels=max_pixels)
    return 1 if image.ndim == 2 or image.shape[2] == 1 else 3


def prepare_all(
    samples: list[Sample], spec: PreprocessSpec, *, max_pixels: int, threads: int = 4
) -> np.ndarray:
    """Decode + prepare every sample into one float32 N x H x W x C array."""
    out = np.empty((len(samples), spec.height, spec.width, spec.channels), np.float32)

    def load(i: int) -> None:
        out[i] = prepare(read_image(samples[i].path, max_pixels=max_pixels), spec)

    # cv2 decoding and resizing release the GIL, so threads scale here.
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(load, range(len(samples))))
    return out


class PreparedImageDataset(Dataset):
    """Prepared images + labels; augmentation (train) then the contract's normalize()."""

    def __init__(
        self,
        prepared: np.ndarray,
        labels: np.ndarray,
        spec: PreprocessSpec,
        augment=None,
        targets: np.ndarray | None = None,
    ) -> None:
        if len(prepared) != len(labels) or (targets is not None and len(targets) != len(labels)):
            raise ValueError("images, labels and targets differ in length")
        self.prepared = prepared
        self.labels = labels  # class indices: sampler weights, metrics
        self.targets = targets  # class probabilities (N x C) to train on instead, if given
        self.spec = spec
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        target = (
            int(self.labels[index])
            if self.targets is None
            else torch.from_numpy(self.targets[index])
        )
        return self._finish(self.prepared[index]), target

    def _finish(self, image: np.ndarray) -> torch.Tensor:
        """Augment (if any), clip to [0, 1] and normalise a prepared image."""
        if self.augment is not None:
            image = self.augment(image=image)["image"]
            if image.ndim == 2:  # some albumentations ops drop a trailing 1-channel axis
                image = image[:, :, None]
            image = np.clip(image, 0.0, 1.0)
        return torch.from_numpy(normalize(image, self.spec))

    def expected_counts(self, n_classes: int) -> np.ndarray:
        """Images per class in an average epoch: what inverse-frequency class weights
        should balance."""
        return np.bincount(self.labels, minlength=n_classes).astype(np.float64)

    def reseed(self, seed: int) -> None:
        """Give this copy of the dataset (one per loader worker) its own random streams."""
        if self.augment is not None:
            self.augment.set_random_seed(seed)


class CrackPaintingDataset(PreparedImageDataset):
    """Training images where each draw of a good image becomes, with probability `share`,
    a synthetic defect: cracks painted by `datasets.synth.el_cracks` before augmentation,
    labelled `defective` (a one-hot target when training on soft targets). A fresh crack
    is painted at every draw, so no two epochs see the same one."""

    def __init__(
        self,
        prepared: np.ndarray,
        labels: np.ndarray,
        spec: PreprocessSpec,
        augment=None,
        targets: np.ndarray | None = None,
        *,
        share: float,
        good: int,
        defective: int,
        seed: int,
    ) -> None:
        super().__init__(prepared, labels, spec, augment, targets)
        if not 0.0 <= share < 1.0:
            raise ValueError(f"share of cracked good images must be in [0, 1), not {share}")
        self.share, self.good, self.defective = share, good, defective
        self.rng = np.random.default_rng(seed)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        if self.labels[index] != self.good or self.rng.random() >= self.share:
            return super().__getitem__(index)
        image = paint_el_cracks(self.prepared[index], self.rng)
        if self.targets is None:
            return self._finish(image), self.defective
        target = torch.zeros(self.targets.shape[1], dtype=torch.float32)
        target[self.defective] = 1.0
        return self._finish(image), target

    def reseed(self, seed: int) -> None:
        super().reseed(seed)
        self.rng = np.random.default_rng(seed)

    def expected_counts(self, n_classes: int) -> np.ndarray:
        """As the base class's, after a `share` of the good images moved to the defective
        class."""
        counts = super().expected_counts(n_classes)
        moved = counts[self.good] * self.share
        counts[self.good] -= moved
        counts[self.defective] += moved
        return counts


def reseed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: forked workers inherit one random state (augmentation,
    crack painting) and would draw the same sequence; reseed each from its torch worker
    seed, which derives from the loader's seeded generator, so the draws stay repeatable
    and differ between workers."""
    info = torch.utils.data.get_worker_info()
    if info is None:  # not in a worker process
        return
    dataset = info.dataset
    assert isinstance(dataset, PreparedImageDataset)  # every training dataset of the fit loop
    dataset.reseed(info.seed % 2**32)
