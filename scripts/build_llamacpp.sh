#!/usr/bin/env bash
# Builds llama.cpp's llama-server and llama-quantize from the source vendored in the llama-cpp-python
# sdist (the llama.cpp people get with `pip install llama-cpp-python`), native, CPU only, and converts
# the packaged SmolLM2 GGUF to float32 so both sides of bench/llamacpp.py hold the same weights.
# Everything lands in $LLAMACPP_DIR (default bench/.llamacpp, git-ignored); nothing is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
VERSION=${LLAMACPP_PY_VERSION:-0.3.36}
DIR=${LLAMACPP_DIR:-bench/.llamacpp}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
SRC="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR"
    tar xzf "$DIR/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
fi
if [ ! -x "$DIR/build/bin/llama-server" ] || [ ! -x "$DIR/build/bin/llama-quantize" ]; then
    cmake -S "$SRC" -B "$DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON
    cmake --build "$DIR/build" --target llama-quantize llama-server -j "${LLAMACPP_JOBS:-$(nproc)}"
fi
GGUF=$("$PY" -c 'from server.model import default_gguf_path; print(default_gguf_path())')
if [ ! -f "$DIR/model-f32.gguf" ]; then
    # --allow-requantize: the packaged file is Q4_1; f32 from it holds exactly the weights we dequantise.
    "$DIR/build/bin/llama-quantize" --allow-requantize "$GGUF" "$DIR/model-f32.gguf.tmp" F32
    mv "$DIR/model-f32.gguf.tmp" "$DIR/model-f32.gguf"
fi
echo "$DIR/build/bin/llama-server $DIR/model-f32.gguf"
