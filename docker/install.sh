#!/usr/bin/env bash
# Install plsynth into a Python environment and check its entry point: the steps of the Docker
# image (Dockerfile runs this), also run by CI (tests/test_docker_install.py) in a fresh virtual
# environment as a non-root user, because no Docker engine runs on the development machines.
#
#   docker/install.sh SRC [--variant cpu|gpu] [--no-deps] [--check-only]
#
#   SRC           the plsynth source tree or a built wheel
#   --variant     cpu: onnxruntime + openvino; gpu: onnxruntime-gpu + tensorrt (needs pypi.nvidia.com at build time)
#   --no-deps     install plsynth alone (dependencies already importable; CI uses this to stay cheap)
#   --check-only  skip the install, run only the checks
#
# Environment: PYTHON (default python3), PLSYNTH_MODEL (bundle to verify, optional),
# LUNGMASK_WEIGHTS (lungmask .pth to check, optional). Nothing is written to $HOME.
set -euo pipefail

SRC=""
VARIANT=cpu
NO_DEPS=0
CHECK_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) VARIANT="$2"; shift 2 ;;
    --no-deps) NO_DEPS=1; shift ;;
    --check-only) CHECK_ONLY=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) SRC="$1"; shift ;;
  esac
done
PYTHON="${PYTHON:-python3}"
BIN="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")"
case "$VARIANT" in cpu|gpu) ;; *) echo "install.sh: --variant must be cpu or gpu, got $VARIANT" >&2; exit 2 ;; esac

if [ "$CHECK_ONLY" = 0 ]; then
  [ -n "$SRC" ] || { echo "install.sh: give the source tree or wheel to install" >&2; exit 2; }
  if [ "$NO_DEPS" = 1 ]; then
    # No network: build with the setuptools already importable, install plsynth alone.
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation "$SRC"
  else
    # torch pinned in the same command (see pyproject.toml: an unpinned resolve pulls a CUDA build
    # on CPU machines); on the GPU image the same pin resolves to PyPI's CUDA wheel.
    extra_index=()
    if [ "$VARIANT" = gpu ]; then extra_index=(--extra-index-url https://pypi.nvidia.com); fi
    "$PYTHON" -m pip install --quiet --disable-pip-version-check "${extra_index[@]}" "torch==2.13.0" "${SRC}[${VARIANT}]"
  fi
fi

echo "install.sh: checking the entry point"
help_text="$("$BIN/plsynth-infer" --help)"
case "$help_text" in *PLSYNTH_MODEL*) ;; *) echo "install.sh: plsynth-infer --help does not mention PLSYNTH_MODEL" >&2; exit 1 ;; esac
"$PYTHON" - <<'PY'
import importlib, os, sys
from importlib.metadata import version
for module in ("plsynth.deploy.infer_cli", "plsynth.deploy.predictor", "plsynth.deploy.engines"):
    importlib.import_module(module)
print("plsynth", version("plsynth"))
try:
    import onnxruntime as ort
    print("onnxruntime", ort.__version__, ort.get_available_providers())
except ImportError:
    print("onnxruntime not installed: plsynth-infer will use the torch engine")
try:
    from plsynth.deploy.engines import import_openvino  # without openvino's usage telemetry
    print("openvino", import_openvino().__version__, "(plsynth-infer's default CPU engine)")
except ImportError:
    print("openvino not installed: plsynth-infer runs ONNX Runtime on the CPU")
from plsynth.bundles.tensorrt_engine import tensorrt_status
print("tensorrt", tensorrt_status())
bundle = os.environ.get("PLSYNTH_MODEL")
if bundle:
    from plsynth.bundles.segmenter import load_bundle
    b = load_bundle(bundle)  # verifies every sha256
    print("bundle ok:", bundle, "networks", b.network_names, "input", b.image_size)
weights = os.environ.get("LUNGMASK_WEIGHTS")
if weights and not os.path.isfile(weights):
    sys.exit(f"lungmask weights {weights} not found")
PY
echo "install.sh: ok"
