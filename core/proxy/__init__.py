"""The OpenAI/Anthropic-compatible proxy (see service.py): routing by `model`, streaming relay, activity."""

from __future__ import annotations

from core.proxy.service import Proxy

__all__ = ['Proxy']
