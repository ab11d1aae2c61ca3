"""Llama Async Proxy core: everything but the UI. Nothing in here imports NiceGUI."""

__version__ = '0.1.0'
