#!/usr/bin/env bash
# Build (or take from the cache) llama-cpp-python 0.3.36 with kvmerge-local's patches, and install it
# into the given virtual environment.
#
#   scripts/build_llama.sh .venv
#
# - gets the sdist from the package index and checks its sha256;
# - checks the vendored llama.cpp commit, `git apply --check`s then applies patches/*.patch;
# - builds a wheel (CPU; CUDA when KVMERGE_CUDA=1, or when nvcc AND a GPU are present);
# - caches the wheel in $KVMERGE_CACHE (default ~/.cache/kvmerge-local) under a key made of the sdist
#   sha256, the patches' sha256, the CMake arguments, the compiler and the CPU flags (GGML_NATIVE builds
#   for this CPU), so a second run installs in seconds and a stale wheel is never used.
set -euo pipefail

VENV=${1:?usage: build_llama.sh VENV}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${KVMERGE_CACHE:-$HOME/.cache/kvmerge-local}
VERSION=0.3.36
SDIST_SHA=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
LLAMA_COMMIT=0c1e57098bba43ac29e6e3b677cdceebdd22334f
SDIST=$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz
PY=$VENV/bin/python

say() { printf '[build_llama] %s\n' "$*" >&2; }

# --- 1. the sdist, verified ------------------------------------------------------------------------
mkdir -p "$CACHE/sdist" "$CACHE/wheels"
if [ -f "$SDIST" ] && [ "$(sha256sum "$SDIST" | cut -d' ' -f1)" != "$SDIST_SHA" ]; then
    say "cached sdist has the wrong sha256: removing it"
    rm -f "$SDIST"
fi
if [ ! -f "$SDIST" ]; then
    say "downloading llama-cpp-python==$VERSION sdist"
    "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE/sdist"
fi
got=$(sha256sum "$SDIST" | cut -d' ' -f1)
if [ "$got" != "$SDIST_SHA" ]; then
    say "sdist sha256 mismatch: got $got, want $SDIST_SHA"; rm -f "$SDIST"; exit 1
fi

# --- 2. build configuration and cache key ------------------------------------------------------------
CMAKE_ARGS_BUILD="-DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON"
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
if [ "${KVMERGE_CUDA:-}" = "1" ] || { [ "${KVMERGE_CUDA:-}" != "0" ] && command -v nvcc >/dev/null 2>&1 && has_gpu; }; then
    # flash-attention CUDA kernels exist only for matched K/V types unless all quant pairs are compiled
    CMAKE_ARGS_BUILD="$CMAKE_ARGS_BUILD -DGGML_CUDA=on -DGGML_CUDA_FA_ALL_QUANTS=ON"
    [ -n "${KVMERGE_CUDA_ARCH:-}" ] && CMAKE_ARGS_BUILD="$CMAKE_ARGS_BUILD -DCMAKE_CUDA_ARCHITECTURES=$KVMERGE_CUDA_ARCH"
    say "building with CUDA"
fi
CMAKE_ARGS_BUILD="$CMAKE_ARGS_BUILD ${KVMERGE_CMAKE_ARGS:-}"
PATCH_SHA=$(cat "$ROOT"/patches/*.patch | sha256sum | cut -d' ' -f1)
CC_VER=$( (cc --version 2>/dev/null || true; c++ --version 2>/dev/null || true) | head -n 2 | tr '\n' ' ')
CPU_FLAGS=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | sha256sum | cut -d' ' -f1)
PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
KEY=$(printf '%s\n' "$SDIST_SHA" "$PATCH_SHA" "$CMAKE_ARGS_BUILD" "$CC_VER" "$CPU_FLAGS" "$PYTAG" | sha256sum | cut -c1-24)
WDIR=$CACHE/wheels/$KEY

install_wheel() {
    "$PY" -m pip install -q --no-deps --force-reinstall "$WDIR"/llama_cpp_python-*.whl
    # runtime deps of llama-cpp-python's Python package
    "$PY" -m pip install -q "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3"
}

installed_key=$("$PY" - <<'EOF' 2>/dev/null || true
import pathlib, llama_cpp
p = pathlib.Path(llama_cpp.__file__).parent / "KVMERGE_BUILD_KEY"
print(p.read_text().strip() if p.exists() else "")
EOF
)
if [ "$installed_key" = "$KEY" ]; then
    say "patched llama-cpp-python already installed (key $KEY)"
    exit 0
fi

if [ -f "$WDIR/KEY" ] && [ "$(cat "$WDIR/KEY")" = "$KEY" ] && ls "$WDIR"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    say "using cached wheel $WDIR"
    install_wheel
else
    # --- 3. unpack, verify, patch, build ------------------------------------------------------------
    rm -rf "$WDIR"
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/kvmerge-build.XXXXXX")
    trap 'rm -rf "$TMP"' EXIT
    tar -xzf "$SDIST" -C "$TMP"
    SRC=$TMP/llama_cpp_python-$VERSION
    commit=$(git -C "$SRC/vendor/llama.cpp" rev-parse HEAD)
    if [ "$commit" != "$LLAMA_COMMIT" ]; then
        say "vendored llama.cpp is at $commit, the patches are for $LLAMA_COMMIT"; exit 1
    fi
    for p in "$ROOT"/patches/*.patch; do
        git -C "$SRC/vendor/llama.cpp" apply --check "$p" || { say "patch does not apply: $p"; exit 1; }
        git -C "$SRC/vendor/llama.cpp" apply "$p"
        say "applied $(basename "$p")"
    done
    say "building the wheel (CMAKE_ARGS=$CMAKE_ARGS_BUILD); this takes ~10 min on 2 cores"
    start=$(date +%s)
    CMAKE_ARGS="$CMAKE_ARGS_BUILD" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        "$PY" -m pip wheel -q --no-deps -w "$TMP/wheel" "$SRC" >"$TMP/build.log" 2>&1 || {
        tail -n 40 "$TMP/build.log" >&2; say "wheel build failed"; exit 1; }
    say "built in $(( $(date +%s) - start )) s"
    mkdir -p "$WDIR.tmp"
    cp "$TMP"/wheel/llama_cpp_python-*.whl "$WDIR.tmp/"
    printf '%s\n' "$KEY" > "$WDIR.tmp/KEY"
    printf 'sdist %s\npatches %s\ncmake %s\ncc %s\npython %s\n' "$SDIST_SHA" "$PATCH_SHA" "$CMAKE_ARGS_BUILD" \
        "$CC_VER" "$PYTAG" > "$WDIR.tmp/RECIPE"
    mv "$WDIR.tmp" "$WDIR"
    install_wheel
fi

"$PY" - "$KEY" <<'EOF'
import pathlib, sys, llama_cpp
(pathlib.Path(llama_cpp.__file__).parent / "KVMERGE_BUILD_KEY").write_text(sys.argv[1] + "\n")
EOF
say "installed patched llama-cpp-python $VERSION (key $KEY)"
