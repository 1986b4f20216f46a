#!/usr/bin/env bash
# Installs js-ipfs 0.66.1 from npm into .cache/jsipfs: the real IPFS implementation the tests compare CIDs
# against and pull from (offline, loopback only). Idempotent: a complete install returns at once.
#
# Recipe (docs/ipfs.md): `npm install --omit=optional --ignore-scripts` with pinned overrides for three
# libp2p packages whose newer releases break js-ipfs, and a `Promise.withResolvers` polyfill for Node 20,
# preloaded through NODE_OPTIONS by whoever starts the daemon (tests/mesh/ipfs/jsipfs.py).
set -euo pipefail
cd "$(dirname "$0")/.."

dest=".cache/jsipfs"
marker="$dest/.installed-0.66.1"
if [ -f "$marker" ] && [ -x "$dest/node_modules/.bin/jsipfs" ]; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "install_ipfs_oracle: npm is not installed (need Node >= 18 with npm)" >&2
  exit 1
fi

mkdir -p "$dest"
cat > "$dest/package.json" <<'JSON'
{
  "name": "shoal-ipfs-oracle",
  "private": true,
  "version": "0.0.0",
  "dependencies": { "ipfs": "0.66.1" },
  "overrides": {
    "@libp2p/tcp": "6.1.2",
    "@libp2p/websockets": "5.0.5",
    "@multiformats/mafmt": "11.1.1"
  }
}
JSON
cat > "$dest/polyfill.cjs" <<'JS'
// Node 20 lacks Promise.withResolvers, which recent dependencies of js-ipfs call.
if (typeof Promise.withResolvers !== "function") {
  Promise.withResolvers = function withResolvers() {
    let resolve;
    let reject;
    const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
    return { promise, resolve, reject };
  };
}
JS

attempt=1
until (cd "$dest" && npm install --omit=optional --ignore-scripts --no-audit --no-fund --loglevel=error); do
  if [ "$attempt" -ge 3 ]; then
    echo "install_ipfs_oracle: npm install failed $attempt times; the IPFS oracle tests will fail" >&2
    exit 1
  fi
  attempt=$((attempt + 1))
  echo "install_ipfs_oracle: npm install failed, retrying ($attempt/3)" >&2
  sleep $((attempt * 5))
done

if [ ! -x "$dest/node_modules/.bin/jsipfs" ]; then
  echo "install_ipfs_oracle: npm finished but $dest/node_modules/.bin/jsipfs is missing" >&2
  exit 1
fi
NODE_OPTIONS="--require $(pwd)/$dest/polyfill.cjs" "$dest/node_modules/.bin/jsipfs" --version >/dev/null
touch "$marker"
echo "install_ipfs_oracle: js-ipfs installed in $dest"
