"""Coverage-guided fuzzing of the upload decoder with atheris (libFuzzer).

The target is the function the service runs on every uploaded image,
`serving.engine._decode_and_preprocess` (container checks, Pillow header, OpenCV decode,
preprocessing, hash), with the service's default pixel limit. `ImageDecodeError` is the
documented refusal; any other exception, a run over `-timeout` seconds or over
`-rss_limit_mb` is a crash, saved under `-artifact_prefix`. Coverage is Python's: our
code and Pillow's header parsers are instrumented, the C decoders are not.

    pip install -e '.[fuzz]'
    python tests/fuzz/fuzz_decode.py -max_total_time=300              # /tmp corpus, kept
    python tests/fuzz/fuzz_decode.py -max_total_time=3600 CORPUS_DIR   # seeded when empty
    python tests/fuzz/fuzz_decode.py /tmp/cellinspect-fuzz-decode-crashes/crash-...  # replay

A corpus folder that is empty is seeded with tests/hostilekit.py's images. Defaults, each
overridable: -max_total_time=60 -timeout=10 -rss_limit_mb=3072 -max_len=131072
-artifact_prefix=/tmp/cellinspect-fuzz-decode-crashes/ (TMPDIR respected).
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import atheris
import cv2

with atheris.instrument_imports(include=["cellinspect", "PIL"]):
    from cellinspect.datasets.errors import ImageDecodeError
    from cellinspect.datasets.preprocess import PreprocessSpec
    from cellinspect.serving.engine import _decode_and_preprocess
    from cellinspect.serving.settings import Settings

MAX_PIXELS = Settings.model_fields["max_pixels"].default
# A gray and an RGB model input: preprocessing must take whatever decoding returns.
SPECS = (
    PreprocessSpec(height=128, width=128, channels=1),
    PreprocessSpec(height=224, width=224, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3),
)
DEFAULTS = {
    "-max_total_time": "60",
    "-timeout": "10",
    "-rss_limit_mb": "3072",
    "-max_len": "131072",
    "-artifact_prefix": f"{tempfile.gettempdir()}/cellinspect-fuzz-decode-crashes/",
}
# Where libFuzzer keeps the inputs that reached new code, seeded when empty, reused after.
DEFAULT_CORPUS = Path(tempfile.gettempdir()) / "cellinspect-fuzz-decode"
SEED_MAX_BYTES = 131_072


def test_one_input(data: bytes) -> None:
    try:
        decoded = _decode_and_preprocess(data, SPECS[len(data) & 1], MAX_PIXELS, False)
    except ImageDecodeError:
        return
    if decoded.tensor.shape != SPECS[len(data) & 1].input_shape:
        raise AssertionError(f"tensor of shape {decoded.tensor.shape} from a decoded image")


def write_seeds(folder: Path) -> int:
    """The hostile corpus (tests/hostilekit.py) as seed files; returns how many."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hostilekit import hostile_images

    cases = hostile_images(max_pixels=MAX_PIXELS, max_body_bytes=32 * 1024 * 1024)
    seeds = [c for c in cases if 0 < len(c.data) <= SEED_MAX_BYTES]
    for case in seeds:
        (folder / case.name).write_bytes(case.data)
    return len(seeds)


def main(argv: list[str]) -> None:
    # Millions of refusals: OpenCV's and Pillow's per-input complaints would drown the stats.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    warnings.simplefilter("ignore")
    options = dict(arg.split("=", 1) for arg in argv[1:] if arg.startswith("-") and "=" in arg)
    flags = [f"{k}={v}" for k, v in DEFAULTS.items() if k not in options]
    Path({**DEFAULTS, **options}["-artifact_prefix"]).mkdir(parents=True, exist_ok=True)
    paths = [Path(arg) for arg in argv[1:] if not arg.startswith("-")]
    if not paths:
        paths = [DEFAULT_CORPUS]
        argv = [*argv, str(DEFAULT_CORPUS)]
    if paths[0].is_dir() or not paths[0].exists():  # a corpus folder, not an input to replay
        paths[0].mkdir(parents=True, exist_ok=True)
        if not any(paths[0].iterdir()):
            count = write_seeds(paths[0])
            print(f"{paths[0]}: seeded with {count} files of tests/hostilekit.py", file=sys.stderr)
    atheris.Setup([argv[0], *flags, *argv[1:]], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
