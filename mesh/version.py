"""shoal's version, as installed (pyproject's `version`): `shoal --version`, `/v1/node`, the TUI header."""

from importlib import metadata


def shoal_version() -> str:
    try:
        return metadata.version("shoal")
    except metadata.PackageNotFoundError:
        return "0.0.0+local"
