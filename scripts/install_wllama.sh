#!/usr/bin/env bash
# Vendors wllama (llama.cpp built to WebAssembly, MIT) for the join page: a browser tab that joined the mesh
# runs the default model with it and serves offloaded requests (docs/browser.md). Pinned by version and by
# the npm registry's sha512 integrity; only the ES module, the single-thread wasm build and the licence are
# kept, in mesh/api/static/join/vendor/wllama/ (git-ignored), which the node serves under /join/vendor/.
# Without it the join page still joins and chats, and says the tab does not compute.
#
# Why 2.4.0 and not 3.x: wllama 3 drops the low-level API (tokenize, decode, sampling) and its completion
# call refuses a prompt given as token ids; a mesh member must run the origin's exact prompt ids.
# Idempotent: a complete install returns at once. Skips (exit 0, with a message) where npm is absent.
set -euo pipefail
cd "$(dirname "$0")/.."

version="2.4.0"
integrity="sha512-KuVHeTUXcqHF01d85q3nWaRSVLpszULNGjO+nx4cyZ8sBjZvKSMViWNCfcs/1w2bqjyegERJzWsrdQSHSEoSlQ=="
dest="mesh/api/static/join/vendor/wllama"
marker="$dest/.installed-$version"
if [ -f "$marker" ] && [ -f "$dest/index.js" ] && [ -f "$dest/wllama.wasm" ]; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "install: npm is not installed: the join page will not compute (wllama not vendored)" >&2
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if ! (cd "$work" && npm pack --silent "@wllama/wllama@$version" >/dev/null 2>&1); then
  echo "install: could not fetch @wllama/wllama@$version from npm: the join page will not compute" >&2
  exit 0
fi
tarball="$(ls "$work"/*.tgz)"
got="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
if [ "$got" != "$integrity" ]; then
  echo "install: @wllama/wllama@$version does not match its pinned integrity ($got): not vendored" >&2
  exit 1
fi
tar xzf "$tarball" -C "$work" package/esm/index.js package/esm/single-thread/wllama.wasm package/LICENCE
rm -rf "$dest"
mkdir -p "$dest"
cp "$work/package/esm/index.js" "$dest/index.js"
cp "$work/package/esm/single-thread/wllama.wasm" "$dest/wllama.wasm"
cp "$work/package/LICENCE" "$dest/LICENCE"
touch "$marker"
echo "install: wllama $version vendored in $dest (the join page can serve the default model)"
