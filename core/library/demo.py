"""A demo model for a machine with no models and no network: a tiny llama with random weights, generated here in a
second with `gguf`. It loads, chats (nonsense), streams and shows metrics and logs, so every page can be tried
before a real model is downloaded. Its name says what it is."""

from __future__ import annotations

import secrets
from pathlib import Path

from core.library.tiny_gguf import write_tiny_gguf

DEMO_FILE = 'demo-tiny-random-weights.gguf'
DEMO_NAME = 'Demo model (random weights: it talks nonsense)'


def create_demo_model(folder: Path) -> Path:
    """Write the demo model into `folder` (made if missing) and return its path; blocking (about a second)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / DEMO_FILE
    if target.exists():
        return target
    # A hidden, unique name until whole: the library never sees a partial file, and two clicks do not collide.
    part = folder / f'.{DEMO_FILE}.{secrets.token_hex(4)}.part'
    write_tiny_gguf(part, name=DEMO_NAME, seed=42)
    part.replace(target)
    return target
