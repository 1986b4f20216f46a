#!/usr/bin/env bash
# Builds llama.cpp's own split-over-network tools — `ggml-rpc-server` and `llama-bench` (RPC backend) — for
# `bench/split.py --llama-rpc`, which runs llama.cpp's split of the same GGUF in the same rounds as shoal's
# (docs/split.md, *Against llama.cpp's RPC split*). Never needed by the tests or CI.
#
# The source is the llama-cpp-python sdist shoal's reference tests install (its vendored llama.cpp), pinned
# by version and sha256; the binaries land in .cache/llama-rpc/bin (git-ignored). Takes ~5 minutes on 2 cores.
# Idempotent: a complete build returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

version="0.3.36"
sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
dest=".cache/llama-rpc"
if [ -x "$dest/bin/ggml-rpc-server" ] && [ -x "$dest/bin/llama-bench" ]; then
  exit 0
fi
for tool in cmake ninja g++; do
  command -v "$tool" >/dev/null 2>&1 || { echo "build_llama_rpc: $tool is not installed" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
scripts/py -m pip download --quiet --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version"
tarball="$work/llama_cpp_python-$version.tar.gz"
got="$(sha256sum "$tarball" | cut -d' ' -f1)"
if [ "$got" != "$sha256" ]; then
  echo "build_llama_rpc: llama-cpp-python $version's sdist does not match its pinned sha256 ($got)" >&2
  exit 1
fi
tar xzf "$tarball" -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
# static: the two binaries stand alone once the build folder is gone
cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_RPC=ON \
  -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
ninja -C "$work/build" ggml-rpc-server llama-bench >/dev/null
rm -rf "$dest"
mkdir -p "$dest/bin"
cp "$work/build/bin/ggml-rpc-server" "$work/build/bin/llama-bench" "$dest/bin/"
echo "build_llama_rpc: llama.cpp (llama-cpp-python $version) with RPC built in $dest/bin"
