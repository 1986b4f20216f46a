"""`python -m shoal.mesh ARGS` runs the `shoal` command (tests and the TUI launcher start nodes this way)."""

import sys

from shoal.mesh.commands.cli import main

sys.exit(main(sys.argv[1:]))
