"""Llama Async Proxy: parse the command line, build the System, mount the API, proxy and pages, run."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from core import __version__
from core.runtime import GC_CLOCK
from core.settings import SettingsManager, is_loopback

log = logging.getLogger('llama_async_proxy')
RECONNECT_TIMEOUT_S = 15.0
EXIT_DATA_DIR = 2  # the data dir cannot be created or written (a message says which and what to do)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog='llama-async-proxy',
        description='Run llama.cpp llama-server for your GGUF models behind an OpenAI-compatible proxy, '
        'with a live web UI.',
    )
    p.add_argument('--host', help='interface to bind (default 127.0.0.1; anything else needs api_keys set)')
    p.add_argument('--port', type=int, help='HTTP port for the UI, the /api REST API and the /v1 proxy (default 8080)')
    p.add_argument(
        '--models-dir',
        action='append',
        dest='models_dirs',
        metavar='DIR',
        help='folder to scan for GGUF models; repeat for several (replaces models_dirs from the config)',
    )
    p.add_argument(
        '--config', type=Path, metavar='FILE', help='JSON config file (default: $LAP_CONFIG, else the user config dir)'
    )
    p.add_argument('--ssl-certfile', type=Path, metavar='PEM', help='TLS certificate: serve HTTPS (with --ssl-keyfile)')
    p.add_argument('--ssl-keyfile', type=Path, metavar='PEM', help='TLS private key for --ssl-certfile')
    p.add_argument('--native', action='store_true', help='open in a native desktop window (needs pywebview)')
    p.add_argument('--no-browser', action='store_true', help='do not open a browser tab on start')
    p.add_argument('--log-level', choices=['debug', 'info', 'warning', 'error'], help='app log level (default info)')
    p.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    return p.parse_args(argv)


def storage_secret(data_dir: Path) -> str:
    """A per-installation secret for NiceGUI's browser storage, kept in the data dir. Raises DataDirError."""
    from core.fsutil import atomic_write_text
    from core.system import data_dir_errors

    path = data_dir / 'storage_secret'
    with data_dir_errors(data_dir):
        if path.exists():
            return path.read_text().strip()
        secret = secrets.token_urlsafe(32)
        atomic_write_text(path, secret)
        path.chmod(0o600)
    return secret


def build(args: argparse.Namespace) -> Any:
    """Create the System and register routers, proxy and pages on NiceGUI's app. Returns the System."""
    cli = {
        'host': args.host,
        'port': args.port,
        'models_dirs': args.models_dirs,
        'log_level': args.log_level,
        'ssl_certfile': args.ssl_certfile,
        'ssl_keyfile': args.ssl_keyfile,
    }
    config_path = args.config or (Path(os.environ['LAP_CONFIG']) if os.environ.get('LAP_CONFIG') else None)
    config = SettingsManager(config_path=config_path, cli=cli)
    # NiceGUI keeps browser storage (the login's key digest) in ./.nicegui, world-readable, unless told; it reads
    # this when first imported, so before the import below.
    storage = config.settings.data_dir / 'browser-storage'
    os.environ.setdefault('NICEGUI_STORAGE_PATH', str(storage))
    from nicegui import app

    from core.api import include_all
    from core.system import System, data_dir_errors
    from ui import register_pages

    system = System(config)  # creates and checks the data dir first (DataDirError)
    storage_path = Path(os.environ['NICEGUI_STORAGE_PATH'])
    with data_dir_errors(storage_path):
        storage_path.mkdir(mode=0o700, parents=True, exist_ok=True)
    app.state.system = system

    async def start() -> None:  # (NiceGUI runs an async startup handler as a task: not awaited before the next)
        await system.start()
        freeze_startup_objects()  # once the System's own objects are built too

    app.on_startup(start)
    app.on_shutdown(system.stop)
    include_all(app)  # API routers before any page
    system.frontdoor.install(app)
    register_pages(system)
    return system


def freeze_startup_objects() -> None:
    """Leave what the imports and the startup built (NiceGUI, FastAPI, plotly, the System: ~170k objects) out of the
    garbage collector's full passes, which walked all of it with the loop stopped: 106 ms a pass here, 1.2 ms once
    frozen with 20k live rows on top (`.venv/bin/python bench/gc_pause.py`). Passes come more often after (a quarter
    of a smaller heap sets one off), each a few ms. What is frozen is still freed by its reference count. From here on
    every pass and its time is counted (`/api/health/runtime`: ~200 passes and ~0.13 s over a bench run of ~25 000
    requests at c=4, ~5 us a request; a gen-0 threshold of 20000 instead of 700 took as long in all, so it is kept)."""
    GC_CLOCK.install()
    gc.collect()
    gc.freeze()


def prepare_native_window() -> None:
    """`--native`: NiceGUI opens the app in a pywebview window run by a process of its own. When that window
    closes, NiceGUI runs the shutdown handlers (System.stop, which stops every llama-server child) and exits."""
    try:
        import webview  # noqa: F401
    except ImportError:
        sys.exit('--native needs pywebview: pip install ".[native]" (or run without --native)')
    from nicegui import app

    if sys.platform.startswith('linux'):
        # `.[native]` brings Qt WebEngine on Linux (pip wheels, see pyproject.toml); pywebview would try GTK
        # first and print a traceback when PyGObject is missing. PYWEBVIEW_GUI still chooses, when set.
        if not os.environ.get('PYWEBVIEW_GUI') and importlib.util.find_spec('qtpy') is not None:
            app.native.start_args.setdefault('gui', 'qt')
        if os.geteuid() == 0:
            # Chromium (inside Qt WebEngine) refuses to run as root with its sandbox; the window shows only this
            # app's own pages on loopback.
            os.environ.setdefault('QTWEBENGINE_DISABLE_SANDBOX', '1')
    app.native.on('loaded', lambda: log.info('native window: page loaded'))
    app.on_connect(lambda client: log.info('native: a page connected: %s', client.page.path))
    app.native.on('closed', lambda: log.info('native window closed: stopping the app and its llama-servers'))
    app.on_shutdown(lambda: log.info('native window: shutdown done'))  # after System.stop (registered first)


def main(argv: list[str] | None = None) -> None:
    simulated = bool(os.environ.get('NICEGUI_USER_SIMULATION'))  # NiceGUI's `User` test fixture runs this file
    args = parse_args([] if simulated else argv)
    logging.basicConfig(
        level=(args.log_level or 'info').upper(), format='%(asctime)s %(levelname)s %(name)s: %(message)s'
    )
    from core.system import DataDirError

    try:
        system = build(args)
        secret = storage_secret(system.config.settings.data_dir)
    except DataDirError as e:  # one line saying which folder and what to do, not a traceback
        print(f'llama-async-proxy: {e}', file=sys.stderr)
        sys.exit(EXIT_DATA_DIR)
    settings = system.config.settings
    for warning in system.config.warnings:
        print(f'config: {warning.field} (from {warning.source}) ignored: {warning.message}', file=sys.stderr)
    if settings.api_keys_file and any(w.field == 'api_keys_file' for w in system.config.warnings):
        sys.exit('Refusing to start without the keys of api_keys_file (see above): the app would be open to anyone.')
    if not is_loopback(settings.host) and not settings.api_keys:
        sys.exit(
            f'Refusing to bind {settings.host} without an API key: anyone on the network could use your models.\n'
            'Set one with LAP_API_KEYS=<key> (or "api_keys" in the config file), or bind 127.0.0.1.'
        )
    if bool(settings.ssl_certfile) != bool(settings.ssl_keyfile):
        sys.exit('TLS needs both a certificate and its key: --ssl-certfile and --ssl-keyfile (or neither).')
    if args.native:
        prepare_native_window()

    from nicegui import ui

    from core.httpguard import uvicorn_options

    ui.run(
        host=settings.host,
        port=settings.port,
        title='Llama Async Proxy',
        reload=False,
        show=not args.no_browser,
        native=args.native,
        window_size=(1280, 800) if args.native else None,  # a size also turns native on: only with --native
        storage_secret=secret,
        favicon=str(Path(__file__).parent / 'assets' / 'favicon.svg'),
        fastapi_docs=True,
        show_welcome_message=False,
        # A browser whose socket drops comes back after socket.io's backoff (1–5 s): within this it keeps its page
        # and its state; past NiceGUI's default of 3 s a 1.5 s network cut already forced a reload.
        reconnect_timeout=RECONNECT_TIMEOUT_S,
        uvicorn_logging_level='warning',
        # The app is the endpoint clients talk to, not something behind a reverse proxy: X-Forwarded-For from a
        # local process is not believed (the request log shows the real peer), and no middleware parses an IP
        # address on every request.
        proxy_headers=False,
        server_header=False,  # one header less on every reply, and nothing said about the server software
        # Slow clients closed, connections capped, TLS, the proxy's fast lane (core/httpguard.py).
        **uvicorn_options(settings, system.config, system.fast_lane),
    )


if __name__ == '__main__':
    main()
