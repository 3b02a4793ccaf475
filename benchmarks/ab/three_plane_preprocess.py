"""Before 192fad7: a gray image is repeated into three channels, then scaled, resized and
normalised as HxWx3, and transposed to CxHxW (one more copy)."""

import numpy as np

import cellinspect.serving.engine as engine
from cellinspect.datasets.preprocess import _fit, _scale, to_channels


def _preprocess(image, spec):  # type: ignore[no-untyped-def]
    prepared = _fit(_scale(to_channels(image, spec.channels)), spec)
    mean = np.asarray(spec.mean, np.float32)
    inv_std = np.float32(1.0) / np.asarray(spec.std, np.float32)
    out = (prepared.astype(np.float32, copy=False) - mean) * inv_std
    return np.ascontiguousarray(out.transpose(2, 0, 1))


engine.preprocess = _preprocess
