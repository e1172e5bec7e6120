#!/usr/bin/env bash
# Bootstrap a Kimad development environment on a fresh machine.
#
# Creates a virtual environment, then installs, in this order:
#   1. torch 2.13.0 (the CPU wheel on this machine's disk), numpy, pybind11, ninja,
#      and the test/benchmark tools (requirements/dev.txt);
#   2. Horovod 0.28.1 with PyTorch and Gloo, built from the PyPI sdist with its C++ standard
#      raised from 14 to 17 (torch >= 2.1 headers need C++17). The built wheel is cached
#      outside the repository ($KIMAD_CACHE/wheels/torch-<version>), so a second run installs it in seconds;
#   3. Kimad itself (editable), which compiles the native extension kimad._C.
#
# Re-running on a ready machine does no rebuilds: each step is skipped when what it would
# install is already there (a stamp file records the inputs of steps 1 and 3).
#
# Environment:
#   KIMAD_VENV   virtual environment to create/use        (default: <repo>/.venv)
#   KIMAD_CACHE  cache for the Horovod wheel and sdist     (default: ~/.cache/kimad)
#   PYTHON       interpreter used to create the venv       (default: python3)
#   MAX_JOBS     parallel compile jobs for the extension   (default: nproc)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KIMAD_VENV:-$REPO/.venv}"
CACHE="${KIMAD_CACHE:-$HOME/.cache/kimad}"
PYTHON="${PYTHON:-python3}"
HOROVOD_VERSION="0.28.1"
TORCH_VERSION="2.13.0"

log() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*"; }
die() { printf '[bootstrap] error: %s\n' "$*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null || die "no '$PYTHON' on PATH; set PYTHON=/path/to/python3.11"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || die "Kimad's pinned torch wheel is for Python 3.11; '$PYTHON' is $("$PYTHON" -V 2>&1)"
command -v cmake >/dev/null || die "cmake is needed to build Horovod (apt-get install cmake)"
command -v g++ >/dev/null || die "g++ is needed to build Horovod and kimad._C (apt-get install g++)"

# Horovod's torch extension is built against one torch: key the cached wheel on its version.
WHEELS="$CACHE/wheels/torch-$TORCH_VERSION"
mkdir -p "$WHEELS" "$CACHE/sdist"

# ---- 0. virtual environment --------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

# ---- 1. torch + build and test tools ------------------------------------------------------
req_stamp="$VENV/.kimad-requirements"
req_hash="$(cat "$REPO/requirements/dev.txt" | sha256sum | cut -c1-16)-torch$TORCH_VERSION"
if [[ "$(cat "$req_stamp" 2>/dev/null)" != "$req_hash" ]]; then
  log "installing torch $TORCH_VERSION (CPU wheel) and the build/test tools"
  # torch first and pinned exactly, so nothing later pulls a multi-GB CUDA build.
  "${PIP[@]}" install -q "torch==$TORCH_VERSION"
  "${PIP[@]}" install -q -r "$REPO/requirements/dev.txt" "torch==$TORCH_VERSION"
  echo "$req_hash" >"$req_stamp"
else
  log "torch and tools already installed"
fi

# ---- 2. Horovod 0.28.1 (PyTorch + Gloo), C++17 ----------------------------------------------
if "$PY" -c "import horovod.torch, sys; import horovod; sys.exit(horovod.__version__ != '$HOROVOD_VERSION')" 2>/dev/null; then
  log "horovod $HOROVOD_VERSION already installed"
else
  wheel="$(ls "$WHEELS"/horovod-"$HOROVOD_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
  if [[ -z "$wheel" ]]; then
    log "building horovod $HOROVOD_VERSION from the PyPI sdist (takes ~8-10 minutes on 2 cores; cached afterwards)"
    sdist="$CACHE/sdist/horovod-$HOROVOD_VERSION.tar.gz"
    if [[ ! -f "$sdist" ]]; then
      "${PIP[@]}" download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$CACHE/sdist"
    fi
    build="$(mktemp -d "${TMPDIR:-/tmp}/kimad-horovod-build.XXXXXX")"
    trap 'rm -rf "$build"' EXIT
    tar -xzf "$sdist" -C "$build"
    src="$build/horovod-$HOROVOD_VERSION"
    # The only change to Horovod: torch >= 2.1's headers need C++17 (upstream made the same
    # change after 0.28.1 and never released it).
    for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
      grep -q 'CMAKE_CXX_STANDARD 14' "$f" || die "expected 'CMAKE_CXX_STANDARD 14' in $f; sdist changed?"
      sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/' "$f"
    done
    # Horovod's setup.py imports these at build time (no build isolation: it must see torch).
    "${PIP[@]}" install -q cloudpickle psutil pyyaml packaging cffi wheel setuptools
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_GPU_OPERATIONS= \
    MAKEFLAGS="-j$(nproc)" \
      "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$build/dist" "$src"
    built="$(ls "$build/dist"/horovod-*.whl | head -n1)"
    cp "$built" "$WHEELS/"
    wheel="$WHEELS/$(basename "$built")"
    rm -rf "$build"; trap - EXIT
  else
    log "reusing cached horovod wheel $wheel"
  fi
  "${PIP[@]}" install -q "$wheel" "torch==$TORCH_VERSION"
  "$PY" -c "import horovod.torch" || die "horovod.torch does not import after install; remove $WHEELS and rerun"
fi

# ---- 3. Kimad (editable), builds kimad._C -------------------------------------------------------
src_hash="$(cd "$REPO" && cat setup.py pyproject.toml $(find csrc -type f | sort) | sha256sum | cut -c1-16)"
ext_stamp="$VENV/.kimad-extension"
if [[ "$(cat "$ext_stamp" 2>/dev/null)" == "$src_hash" ]] && "$PY" -c "import kimad._C" 2>/dev/null; then
  log "kimad and kimad._C up to date"
else
  log "installing kimad (editable) and building kimad._C"
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" "${PIP[@]}" install -q --no-build-isolation --no-deps -e "$REPO"
  "$PY" -c "import kimad, kimad._C" || die "kimad._C does not import after the build"
  echo "$src_hash" >"$ext_stamp"
fi

log "ready: $("$PY" -c 'import torch, horovod, kimad; print(f"torch {torch.__version__}, horovod {horovod.__version__}, kimad {kimad.__version__}")')"
