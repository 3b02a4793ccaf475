"""Contract: `models` and `serving` never pull in torch (nor `models` fastapi)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

MODELS = [
    "cellinspect.models",
    "cellinspect.models.card",
    "cellinspect.models.store",
    "cellinspect.models.runtime",
    "cellinspect.models.predict",
    "cellinspect.models.metrics",
    "cellinspect.models.calibration",
    "cellinspect.models.figures",
    "cellinspect.models.leakage",
    "cellinspect.models.evaluate",
    "cellinspect.models.compare",
    "cellinspect.models.shadow",
    "cellinspect.models.plots",
    "cellinspect.models.report",
]

SCRIPT = textwrap.dedent(
    """
    import importlib, sys

    BLOCKED = set(sys.argv[1].split(","))

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocker())
    for module in sys.argv[2].split(","):
        importlib.import_module(module)
    if "cellinspect.models.metrics" in sys.modules:
        # Exercise the lazy imports too (scikit-learn), not only the module tops.
        import numpy as np
        from cellinspect.models.card import DatasetRef
        from cellinspect.models.metrics import evaluate_predictions
        evaluate_predictions([0, 1], np.eye(2), ["good", "bad"], DatasetRef(manifest_hash="h"))
        import cellinspect.models.runtime as runtime
        runtime.available_providers()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    """
)


@pytest.mark.parametrize(
    ("blocked", "modules"),
    [
        (["torch", "fastapi"], MODELS),
        (
            ["torch"],
            [
                "cellinspect.serving",
                "cellinspect.serving.app",
                "cellinspect.serving.shadow",
                "cellinspect.cli",
            ],
        ),
    ],
    ids=["models", "serving"],
)
def test_package_imports_without_forbidden_dependencies(blocked, modules):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, ",".join(blocked), ",".join(modules)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
