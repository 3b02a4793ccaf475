"""Training choices the CLI offers as option types: this module imports neither torch nor
albumentations, so `cellinspect --help` and the serve-only install never load them."""

from __future__ import annotations

from enum import StrEnum

from cellinspect.datasets.samples import Split


class ExportCheckpoint(StrEnum):
    """Which of a run's checkpoints `export` publishes."""

    BEST = "best"  # the epoch with the best validation macro-F1 (best.pt)
    LAST = "last"  # the final epoch (last.pt): for schedules that run to the end


class FitSplits(StrEnum):
    """The manifest splits a run trains on."""

    TRAIN = "train"  # validation held out: epochs, temperature and operating point fitted on it
    # Validation trained on too (a refit, once the recipe is fixed): no epoch is validated,
    # and export calibrates with a twin run of the same recipe on train alone.
    TRAIN_VAL = "train+val"

    @property
    def splits(self) -> tuple[Split, ...]:
        """The manifest splits whose samples the run trains on."""
        return (Split.TRAIN, Split.VAL) if self is FitSplits.TRAIN_VAL else (Split.TRAIN,)
