"""SVG snapshots compared deliberately.

`App.save_screenshot` writes an SVG in which every run of same-styled text is one `<text>` element. We read
it back as lines of (text, styles), mask the values that change from run to run (node id, API port, clock
times), and compare that with the committed reference under `tests/tui/snapshots/`. Colours and text are
compared; pixel positions are not, so a volatile value of a different length cannot fail a test.

Refresh the references after a deliberate UI change with
`SHOAL_UPDATE_SNAPSHOTS=1 python -m pytest tests/tui/test_snapshots.py`, look at them (an SVG opens in a
browser, or `rsvg-convert x.svg -o x.png`), and commit them with the change.
"""

from __future__ import annotations

import difflib
import html
import os
import re
from pathlib import Path

SNAPSHOT_DIR = Path(__file__).parent / "snapshots"
UPDATE = os.environ.get("SHOAL_UPDATE_SNAPSHOTS", "") not in ("", "0")

_TEXT = re.compile(
    r'<text class="(terminal-\d+-r\d+)"[^>]*clip-path="url\(#terminal-\d+-line-(\d+)\)">(.*?)</text>'
)
_RULE = re.compile(r"\.(terminal-\d+-r\d+) \{ ([^}]*) \}")
_CLOCK = re.compile(r"\b\d\d:\d\d:\d\d\b")


def mask(text: str, volatile: dict[str, str]) -> str:
    for value, placeholder in volatile.items():
        text = text.replace(value, placeholder)
    return _CLOCK.sub("<time>", text)


def screen_lines(svg: str, volatile: dict[str, str]) -> list[str]:
    """One entry per terminal line: its masked text (spaces collapsed) and its distinct styles in order."""
    styles = {name: rule.strip() for name, rule in _RULE.findall(svg)}
    lines: dict[int, list[tuple[str, str]]] = {}
    for cls, line, content in _TEXT.findall(svg):
        text = html.unescape(content).replace("\xa0", " ")
        lines.setdefault(int(line), []).append((text, styles.get(cls, "")))
    out = []
    for number in sorted(lines):
        segments = lines[number]
        text = " ".join(mask("".join(t for t, _ in segments), volatile).split())
        seen: list[str] = []
        for t, style in segments:
            if t.strip() and (not seen or seen[-1] != style):
                seen.append(style)
        out.append(f"{number:02d} {text}  ⟨{' | '.join(seen)}⟩")
    return out


def check_snapshot(name: str, svg: str, volatile: dict[str, str], failed_dir: Path) -> None:
    """Compare `svg` with `snapshots/<name>.svg` (or write it when updating); fail with a readable diff."""
    reference = SNAPSHOT_DIR / f"{name}.svg"
    masked_svg = svg
    for value, placeholder in volatile.items():
        masked_svg = masked_svg.replace(value, html.escape(placeholder))
    if UPDATE:
        SNAPSHOT_DIR.mkdir(exist_ok=True)
        reference.write_text(masked_svg)
        return
    if not reference.exists():
        raise AssertionError(f"no reference snapshot {reference}; create it with SHOAL_UPDATE_SNAPSHOTS=1")
    expected = screen_lines(reference.read_text(), volatile)
    actual = screen_lines(svg, volatile)
    if expected != actual:
        failed_dir.mkdir(parents=True, exist_ok=True)
        (failed_dir / f"{name}.svg").write_text(masked_svg)
        diff = "\n".join(difflib.unified_diff(expected, actual, "reference", "now", lineterm="", n=1))
        raise AssertionError(
            f"snapshot {name} differs (new SVG at {failed_dir / (name + '.svg')}; "
            f"refresh with SHOAL_UPDATE_SNAPSHOTS=1 if the change is deliberate):\n{diff}"
        )
