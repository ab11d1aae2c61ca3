"""Where benchmark results go: each benchmark owns one `## ` section of docs/BENCHMARKS.md."""

from __future__ import annotations

import re
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / 'docs' / 'BENCHMARKS.md'


def write_section(title: str, section: str, path: Path = BENCHMARKS) -> None:
    """Replace the section headed `title` (up to the next `## `) or append it; other sections stay as they are."""
    old = path.read_text() if path.exists() else '# Benchmarks\n'
    pattern = re.compile(rf'^{re.escape(title)}\n.*?(?=^## |\Z)', re.S | re.M)
    new = pattern.sub(lambda _: section + '\n\n', old) if pattern.search(old) else old.rstrip('\n') + '\n\n' + section
    path.write_text(new.rstrip('\n') + '\n')
