# make serve: install what is missing, then serve examples/hello.py
# make test:  install what is missing, then run the whole test suite
VENV   ?= .venv
PYTHON ?= python3
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP  := $(VENV)/.installed

.PHONY: serve test deps system-deps browser-deps docs bench bench-quick clean

serve: deps
	$(VENV)/bin/circus-wsgi serve examples.hello:app --static /static=examples/static

test: deps browser-deps
	$(VENV)/bin/python -m pytest

docs: deps
	$(VENV)/bin/sphinx-build -q -W --keep-going -b html docs docs/_build/html

# make bench: the benchmark of docs/benchmarks.rst (about 30 min); bench-quick: hello only, < 3 min
bench: deps $(VENV)/.bench-installed
	$(VENV)/bin/python benchmarks/run.py

bench-quick: deps $(VENV)/.bench-installed
	$(VENV)/bin/python benchmarks/run.py --quick

$(VENV)/.bench-installed: pyproject.toml
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q wrk; }
	$(VENV)/bin/python -m pip install -q -e '.[bench]'
	touch $@

system-deps:
	@command -v mongrel2 >/dev/null && command -v m2sh >/dev/null || { \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q mongrel2-core; }

deps: system-deps $(STAMP)

# The console's browser tests drive Debian's own Chromium through its chromedriver.
browser-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium chromium-driver; }

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) docs/_build .pytest_cache .hypothesis
