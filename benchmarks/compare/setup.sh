#!/usr/bin/env bash
# Virtual environments for the comparison servers of benchmarks/bench_serving.py --compare:
#   .venv-pytriton  Triton Inference Server through PyTriton (pytriton_server.py)
#   .venv-bentoml   BentoML 1.4 (bento_service.py)
# at the repository root, each with its pinned server (requirements-NAME.txt) and this
# project installed editable with its base dependencies only (no torch). Their dependency
# trees conflict with each other and with the project's (PyTriton needs numpy<2), so they
# never go into the project's own .venv.
#
#   benchmarks/compare/setup.sh [pytriton] [bentoml]     (default: both)
#   PYTHON=python3.11 benchmarks/compare/setup.sh        (interpreter for the venvs)
#
# PyTriton's python-backend stub loads libpython3.X.so.1.0: the interpreter must be built
# with a shared libpython (Debian's python3 and pyenv's with --enable-shared are).
# Re-running updates an existing environment in place.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/benchmarks/compare"
PYTHON="${PYTHON:-python3}"
NAMES=("$@")
[ ${#NAMES[@]} -gt 0 ] || NAMES=(pytriton bentoml)

"$PYTHON" - <<'EOF'
import sys, sysconfig
if sys.version_info < (3, 11):
    sys.exit(f"cellinspect needs Python >= 3.11, {sys.executable} is {sys.version.split()[0]}")
if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
    print(f"warning: {sys.executable} has no shared libpython; PyTriton's stub will load the "
          "system's, which must be the same Python minor version", file=sys.stderr)
EOF

for name in "${NAMES[@]}"; do
    case "$name" in
        pytriton) check="import pytriton.triton, tritonclient.http" ;;
        bentoml) check="import bentoml; assert bentoml.__version__.startswith('1.4.'), bentoml.__version__" ;;
        *) echo "unknown comparison server: $name (pytriton, bentoml)" >&2; exit 2 ;;
    esac
    venv="$ROOT/.venv-$name"
    echo "== $name: $venv"
    [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    # One resolver run: the pins constrain cellinspect's own (unpinned) base dependencies.
    "$venv/bin/python" -m pip install --quiet -r "$HERE/requirements-$name.txt" -e "$ROOT"
    "$venv/bin/python" -m pip check
    "$venv/bin/python" -c "$check
import onnxruntime, numpy
from cellinspect.datasets.decode import decode_image
from cellinspect.datasets.preprocess import preprocess
from cellinspect.models.runtime import create_session
print('$name ok: onnxruntime', onnxruntime.__version__, 'numpy', numpy.__version__)"
done
