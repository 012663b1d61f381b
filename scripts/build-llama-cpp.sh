#!/usr/bin/env bash
# Build the llama.cpp tools the GGUF tests and bench/llamacpp_bench.py run, from the llama.cpp that
# the llama-cpp-python sdist on PyPI vendors (pinned below), into a cache outside the clone keyed by
# that version: later runs on the same machine reuse it. Prints the folder holding the binaries.
#
#   scripts/build-llama-cpp.sh            # build once (about 17 minutes on 2 cores), then reuse
#   QWEN3_LLAMA_CPP_CACHE=DIR scripts/build-llama-cpp.sh
set -euo pipefail
VERSION=0.3.36
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${QWEN3_LLAMA_CPP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qwen3/llama-cpp-python-$VERSION}"
TOOLS=(llama-simple llama-completion llama-bench llama-batched-bench llama-perplexity llama-quantize llama-tokenize)
BIN="$CACHE/bin"

built() { for tool in "${TOOLS[@]}"; do [ -x "$BIN/$tool" ] || return 1; done; }

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9  # one build at a time; a second caller waits, then finds it built
if ! built; then
    for tool in cmake ninja g++; do
        command -v "$tool" >/dev/null || { echo "build-llama-cpp: $tool is missing (apt-get install cmake ninja-build g++)" >&2; exit 2; }
    done
    work="$(mktemp -d "$CACHE/build.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    PIP="$ROOT/.venv/bin/pip"
    [ -x "$PIP" ] || PIP="python3 -m pip"
    $PIP download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work" >&2
    tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
    source_dir="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
    echo "build-llama-cpp: building llama.cpp from llama-cpp-python $VERSION in $work" >&2
    cmake -S "$source_dir" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=ON >&2
    cmake --build "$work/build" --target "${TOOLS[@]}" >&2
    mkdir -p "$BIN.tmp"
    for tool in "${TOOLS[@]}"; do cp "$work/build/bin/$tool" "$BIN.tmp/"; done
    rm -rf "$BIN" && mv "$BIN.tmp" "$BIN"  # complete or absent, never half there
fi
echo "$BIN"
