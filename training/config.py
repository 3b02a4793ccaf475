"""Training configuration: typed defaults < YAML file < command-line flags, resolved once."""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cellinspect.datasets.preprocess import ResizeMode
from cellinspect.models.card import OperatingCriteria, ViewSet, check_views_fit
from cellinspect.training.augment import AugmentPreset
from cellinspect.training.choices import ExportCheckpoint, FitSplits
from cellinspect.training.networks import Arch


class BalanceMode(StrEnum):
    LOSS = "loss"  # class-weighted cross-entropy (inverse frequency)
    SAMPLER = "sampler"  # weighted random sampler: every class seen equally often
    NONE = "none"


class OptimizerKind(StrEnum):
    ADAMW = "adamw"
    SGD = "sgd"  # momentum 0.9, Nesterov; wants a larger lr (e.g. 0.05) and weight_decay ~5e-4


class TrainConfig(BaseModel):
    """Everything that decides a training run; saved as config.yaml in the run directory."""

    model_config = ConfigDict(extra="forbid", use_enum_values=False)

    data: str  # data directory (ImageFolder, MVTec, synthetic output) or manifest/CSV file
    out: str  # run directory
    arch: Arch = Arch.MOBILENET_V3_SMALL
    epochs: int = Field(15, ge=1)  # upper bound; early stopping may end sooner
    img_size: tuple[int, int] = (128, 128)  # (height, width) of the model input
    resize: ResizeMode = ResizeMode.STRETCH
    channels: Literal[1, 3] | None = None  # None: 1 if the first image is gray, else 3
    batch_size: int = Field(32, ge=1)  # small data from scratch: more, smaller steps
    optimizer: OptimizerKind = OptimizerKind.ADAMW
    lr: float = Field(2e-3, gt=0)  # peak learning rate
    weight_decay: float = Field(0.05, ge=0)  # decoupled for AdamW, L2 for SGD
    warmup_epochs: float = Field(0.5, ge=0)  # linear warm-up, then cosine decay to 0
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # Weight of the auxiliary stride-16 CAM head's cross-entropy beside the main loss; the
    # exported heatmap reads that head (finer map). 0: no such head, the heatmap is the last
    # feature map's Grad-CAM. 0.25 chosen over 0.5 and 1.0 on the pointing game's validation
    # tiles over three seeds (benchmarks/RESULTS.md, "Defect heatmaps", session 6).
    aux_cam_weight: float = Field(0.25, ge=0)
    # Binary tasks: train on the probability in this metadata key (e.g. ELPV's "probability")
    # instead of the hard label; validation and metrics keep the hard labels.
    soft_label_key: str | None = None
    # Exponential moving average of the weights (per step); validated, checkpointed and
    # exported instead of the raw weights. ~1/(1-decay) steps of memory. None: off.
    ema_decay: float | None = Field(None, gt=0, lt=1)
    # Batch mixing (Beta(alpha, alpha) mixing weights; 0: off; both on: one per batch).
    mixup_alpha: float = Field(0.0, ge=0)
    cutmix_alpha: float = Field(0.0, ge=0)
    # Binary tasks: the share of good training images that, at each draw, get synthetic
    # electroluminescence cracks painted on (datasets.synth.el_cracks) and count as defective.
    # Meant for EL cell images (ELPV); 0: off. Class weights balance the moved labels.
    synth_cracks: float = Field(0.0, ge=0, lt=1)
    balance: BalanceMode = BalanceMode.LOSS
    augment: AugmentPreset = AugmentPreset.FLIPS
    patience: int = Field(5, ge=1)  # epochs without validation improvement before stopping
    # DataLoader worker processes; None: cores - 2 (at most 8). On a 2-core box that is 0:
    # workers there compete with the model's threads (benchmarks/RESULTS.md: 0.92 vs 0.85).
    workers: int | None = Field(None, ge=0)
    threads: int | None = Field(None, ge=1)  # torch intra-op threads; None: all cores owned
    seed: int = 0
    split_seed: int = 0  # for data without a split: deterministic stratified split
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.15, ge=0, lt=1)
    weights: str | None = None  # local pretrained weights file; nothing is downloaded
    device: str = "auto"  # auto, cpu, cuda, cuda:1
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    # NHWC tensors: ~1.8x faster MobileNetV3 training on CPU (depthwise convolutions)
    channels_last: bool = True
    good_class: str | None = None  # None: "ok" or "good" when present
    skip_bad: bool = False  # skip unreadable images (counted) instead of failing
    max_pixels: int = Field(40_000_000, ge=1)
    # Operating point chosen at export from the validation split (None: not used; all None:
    # the 0.5 threshold), checked as OperatingCriteria. See
    # cellinspect.models.calibration.choose_operating_point.
    cost_ratio: float | None = None  # cost of scrapping a good cell / of an escape
    max_escape: float | None = None  # highest share of defects passed
    target_auto_accuracy: float | None = None  # review band: auto accuracy
    # One-sided confidence at which max_escape and target_auto_accuracy must hold (None: on
    # the validation cells as measured).
    confidence: float | None = None
    # The checkpoint export publishes (its --checkpoint overrides). `best` picks an epoch on
    # the validation split, which then flatters the temperature and operating point fitted
    # there; `last` keeps validation unseen by any choice, for a schedule that decays to the
    # end without early stopping.
    export_checkpoint: ExportCheckpoint = ExportCheckpoint.BEST
    # Test-time views the exported graph averages (models.card.ViewSet); export's --views
    # overrides it. Not used in training: validation during training sees the plain image.
    test_time_views: ViewSet = ViewSet.NONE
    # `train+val` refits the fixed recipe on the validation images too (25% more data for
    # ELPV); with nothing held out, no epoch is validated or picked, and export fits the
    # temperature and operating point on the validation predictions of a twin run fitted on
    # train alone (`cellinspect export RUN --calibrate-with TWIN`).
    fit_on: FitSplits = FitSplits.TRAIN

    @field_validator("img_size", mode="before")
    @classmethod
    def _parse_size(cls, value: Any) -> Any:
        """Accept 128, "128", "128x256" or [128, 256]."""
        if isinstance(value, int):
            return (value, value)
        if isinstance(value, str):
            parts = value.lower().split("x")
            if len(parts) == 1:
                return (int(parts[0]), int(parts[0]))
            if len(parts) == 2:
                return (int(parts[0]), int(parts[1]))
            raise ValueError("img_size must look like 128 or 128x256 (height x width)")
        return value

    @field_validator("img_size")
    @classmethod
    def _check_size(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 32 or max(value) > 2048:
            raise ValueError("img_size sides must be between 32 and 2048 pixels")
        return value

    @model_validator(mode="after")
    def _check_synth_cracks(self) -> TrainConfig:
        if self.synth_cracks and self.balance is BalanceMode.SAMPLER:
            raise ValueError(
                "synth_cracks moves good images to the defective class after sampling, so "
                "balance: sampler would not balance the classes; use balance: loss or none"
            )
        return self

    @model_validator(mode="after")
    def _check_criteria(self) -> TrainConfig:
        OperatingCriteria.from_mapping(vars(self))  # a bad range or combination: ValueError
        return self

    @model_validator(mode="after")
    def _check_fit_on(self) -> TrainConfig:
        """Fitted on train+val, the last checkpoint is the only one: the default follows."""
        if self.fit_on is FitSplits.TRAIN_VAL and self.export_checkpoint is ExportCheckpoint.BEST:
            if "export_checkpoint" in self.model_fields_set:
                raise ValueError(
                    "fit_on train+val holds no validation images to pick the best epoch "
                    "with: set export_checkpoint: last"
                )
            self.export_checkpoint = ExportCheckpoint.LAST
        return self

    @model_validator(mode="after")
    def _check_views(self) -> TrainConfig:
        check_views_fit(self.test_time_views, *self.img_size)
        return self

    @property
    def loader_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        return max(0, min(8, len(os.sched_getaffinity(0)) - 2))

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class ConfigError(ValueError):
    """A config file or flag that cannot be used; the message names the file and the key."""


def resolve_config(
    *, yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """defaults < YAML file < explicit overrides (command-line flags that were given)."""
    values: dict[str, Any] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        where = f"{yaml_path}: " if yaml_path else ""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{where}invalid training config: {problems}") from None
