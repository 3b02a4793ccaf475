"""Run the `cellinspect` command line as a user would: a subprocess with its own home."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CELLINSPECT_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "cellinspect.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
