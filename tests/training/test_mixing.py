"""MixUp / CutMix on batches with probability targets."""

from __future__ import annotations

import torch
from torch.nn.functional import one_hot

from cellinspect.training.augment import BatchMixer

N = 6


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is constant i and of class i: a pixel says which image it came from and a
    target says which images were mixed, in which shares."""
    x = torch.arange(N, dtype=torch.float32).view(N, 1, 1, 1).expand(N, 1, 16, 16).clone()
    return x, torch.arange(N)


def test_mixup_blends_images_and_targets_with_the_same_weight() -> None:
    x, y = batch()
    mixer = BatchMixer(N, mixup_alpha=0.4, cutmix_alpha=0.0, seed=1)
    blended = 0
    for _ in range(20):
        mixed, target = mixer(x, y)
        torch.testing.assert_close(target.sum(dim=1), torch.ones(N))
        for i in range(N):
            # target[i] = lam at i, 1 - lam at the partner: the pixels must mix the same way.
            expected = (target[i] * torch.arange(N, dtype=torch.float32)).sum()
            torch.testing.assert_close(mixed[i], torch.full_like(mixed[i], float(expected)))
            blended += int(target[i, i] < 1)
    assert blended > 0


def test_cutmix_target_weight_is_the_share_of_pixels_kept() -> None:
    x, y = batch()
    mixer = BatchMixer(N, mixup_alpha=0.0, cutmix_alpha=1.0, seed=3)
    pasted = 0
    for _ in range(20):
        mixed, target = mixer(x, y)
        for i in range(N):
            values, counts = mixed[i].unique(return_counts=True)
            shares = torch.zeros(N)
            shares[values.long()] = counts.float() / mixed[i].numel()
            torch.testing.assert_close(target[i], shares)
            pasted += int(len(values) > 1)
    assert pasted > 0


def test_soft_targets_are_mixed_as_probabilities() -> None:
    x, _ = batch()
    soft = torch.tensor([[0.9, 0.1]] * 3 + [[0.2, 0.8]] * 3)
    _, target = BatchMixer(2, mixup_alpha=1.0, cutmix_alpha=0.0, seed=0)(x, soft)
    torch.testing.assert_close(target.sum(dim=1), torch.ones(N))
    assert ((target[:, 1] >= 0.1 - 1e-6) & (target[:, 1] <= 0.8 + 1e-6)).all()
    assert not torch.equal(target, soft)


def test_same_seed_same_draws() -> None:
    x, y = batch()
    a = BatchMixer(N, mixup_alpha=0.2, cutmix_alpha=1.0, seed=7)
    b = BatchMixer(N, mixup_alpha=0.2, cutmix_alpha=1.0, seed=7)
    for _ in range(5):
        (xa, ya), (xb, yb) = a(x, y), b(x, y)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_disabled_mixer_only_turns_labels_into_one_hot() -> None:
    x, y = batch()
    mixed, target = BatchMixer(N, mixup_alpha=0.0, cutmix_alpha=0.0, seed=0)(x, y)
    assert torch.equal(mixed, x) and torch.equal(target, one_hot(y, N).float())
