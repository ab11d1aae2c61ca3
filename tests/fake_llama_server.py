#!/usr/bin/env python3
"""A scripted stand-in for llama-server, for fault injection only (the real binary is used everywhere else).

Answers `--version` and `--help` like llama-server, then serves `GET /health` on `--port`. Behaviour by env:
FAKE_IGNORE_TERM=1  ignore SIGTERM (a hung child the supervisor must SIGKILL)
FAKE_LONG_LINE=N    print one N-byte line before serving
FAKE_HANG_FILE=P    stop answering /health (hang the handler) once file P exists
FAKE_TERM_AFTER=S   answer SIGTERM as llama-server does with a task still running: say it cleans up, exit S s
                    later; a second SIGTERM says "terminating immediately" and hangs (its exit() can deadlock)
FAKE_TERM_QUIET=1   with FAKE_TERM_AFTER, say nothing on the first SIGTERM (as a build might not)
FAKE_TERM_SECOND_EXITS=1  with FAKE_TERM_AFTER, exit 0.2 s after a second SIGTERM (the first was lost at start-up)
FAKE_EXIT=N         print an error line and exit with code N at once (a crash loop)
FAKE_GRANDCHILD=P   fork a grandchild in a session of its own that keeps stdout and stderr open for 120 s (its pid
                    is written to file P, for the test to clean up)
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HELP = """----- common params -----

-h,    --help, --usage                  print usage and exit
--version                               show version and build info
-c,    --ctx-size N                     size of the prompt context (default: 0, 0 = loaded from model)
-t,    --threads N                      number of CPU threads to use during generation (default: -1)
-m,    --model FNAME                    model path to load
--host HOST                             IP addresses to listen on
--port PORT                             port to listen (default: 8080)
--metrics                               enable prometheus compatible metrics endpoint (default: disabled)
"""


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        hang = os.environ.get('FAKE_HANG_FILE')
        while hang and os.path.exists(hang):
            time.sleep(0.05)
        body = b'{"status":"ok"}'
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _llama_like_term(after: float):
    heard = []

    def handler(_sig: int, _frame: object) -> None:
        if heard:
            if os.environ.get('FAKE_TERM_SECOND_EXITS'):
                threading.Timer(0.2, lambda: os._exit(0)).start()
                return
            print('Received second interrupt, terminating immediately.', file=sys.stderr, flush=True)
            while True:  # a deadlock in exit()
                time.sleep(1)
        heard.append(1)
        if not os.environ.get('FAKE_TERM_QUIET'):
            print('srv    operator(): operator(): cleaning up before exit...', file=sys.stderr, flush=True)
        threading.Timer(after, lambda: os._exit(0)).start()  # the running task ends, then it exits

    return handler


def main() -> None:
    argv = sys.argv[1:]
    if '--version' in argv:
        print('version: 0 (fake)', file=sys.stderr)
        return
    if '--help' in argv:
        print(HELP)
        return
    if code := os.environ.get('FAKE_EXIT'):
        print(f'main: error: fake failure {time.monotonic():.3f}', file=sys.stderr, flush=True)
        sys.exit(int(code))
    if pid_file := os.environ.get('FAKE_GRANDCHILD'):
        if (pid := os.fork()) == 0:
            os.setsid()  # out of the server's process group: a signal to the group misses it
            time.sleep(120)
            os._exit(0)
        with open(pid_file, 'w') as f:
            f.write(str(pid))
    if os.environ.get('FAKE_IGNORE_TERM'):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if after := os.environ.get('FAKE_TERM_AFTER'):
        signal.signal(signal.SIGTERM, _llama_like_term(float(after)))
    long_line = int(os.environ.get('FAKE_LONG_LINE', '0'))
    if long_line:
        sys.stderr.write('x' * long_line + '\n')
        sys.stderr.flush()
    port = int(argv[argv.index('--port') + 1])
    print(f'I srv  llama_server: listening on http://127.0.0.1:{port}', file=sys.stderr, flush=True)
    ThreadingHTTPServer(('127.0.0.1', port), Handler).serve_forever()


if __name__ == '__main__':
    main()
