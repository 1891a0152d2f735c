#!/usr/bin/env bash
# llama-cpp-python runs Mipha's language model on the CPU (2-3x faster than PyTorch there).
# PyPI ships it as source, so it is compiled here once for this processor (-march=native) and the
# wheel is kept under ~/.cache/mipha-chat, in a folder named after the version and the CPU's
# flags: a wheel built on another processor is never installed. Where it cannot be built, the
# app still runs (on PyTorch) and says so in its log; this script then exits 0 with a warning.
# It is built without OpenMP (GGML_OPENMP=OFF): ggml then synchronises its threads with its own
# spinning barrier. With OpenMP its hundreds of barriers per token are libgomp's, which PyTorch
# shares; once a second thread of ours has run OpenMP work (the reply's thread beside the draft
# reader's or the main one) libgomp counts more threads than cores and sleeps in every barrier
# instead of spinning, and decoding on a 2-core EPYC fell from 5.2-6.1 to 4.2-4.9 tok/s.
# Usage: install-llama-cpp.sh PYTHON
set -uo pipefail
python=${1:?usage: install-llama-cpp.sh PYTHON}
version=0.3.36
if "$python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$version' or b'OPENMP = 1' in llama_cpp.llama_print_system_info())" 2>/dev/null; then
  exit 0
fi
flags=$( (grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || uname -m) | sha256sum | cut -c1-12)
wheels="${XDG_CACHE_HOME:-$HOME/.cache}/mipha-chat/llama-cpp-python/$version-$flags-no-openmp"
warn() { echo "WARNING: $1; the app runs its language model on PyTorch instead (slower on a CPU)." >&2; exit 0; }
if ! compgen -G "$wheels/*.whl" >/dev/null; then
  if ! command -v cmake >/dev/null 2>&1 || ! command -v c++ >/dev/null 2>&1; then
    packages=(cmake g++ make)
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -q && env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}" \
        || warn "could not install cmake and a C++ compiler"
    elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
      sudo apt-get update -q && sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}" \
        || warn "could not install cmake and a C++ compiler"
    else
      warn "llama-cpp-python needs cmake and a C++ compiler to build; install them and run make again"
    fi
  fi
  echo "Building llama-cpp-python $version for this CPU (a few minutes, once)..."
  mkdir -p "$wheels"
  CMAKE_ARGS="${CMAKE_ARGS:-} -DGGML_OPENMP=OFF" \
    "$python" -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python -w "$wheels" "llama-cpp-python==$version" \
    || { rm -rf "$wheels"; warn "llama-cpp-python $version could not be built"; }
fi
"$python" -m pip uninstall -q -y llama-cpp-python 2>/dev/null  # an OpenMP build of the same version
"$python" -m pip install -q "$wheels"/*.whl || warn "llama-cpp-python could not be installed"
