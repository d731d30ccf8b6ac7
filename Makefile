# make serve: install what is missing, then serve examples/hello.py
# make test:  install what is missing, then lint (ruff), type-check (mypy) and run the whole suite
# make test-compiled: the suite again, on the hot modules compiled by mypyc (as a wheel has them)
# make test-trixie: (root) `make test` as the README runs it, on a throwaway Debian 13 (chroot)
VENV   ?= .venv
PYTHON ?= python3
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP  := $(VENV)/.installed
MONGREL2_PREFIX := $(VENV)/mongrel2

.PHONY: serve test test-compiled test-trixie deps system-deps browser-deps docs bench bench-quick clean

serve: deps
	$(VENV)/bin/circus-wsgi serve examples.hello:app --static /static=examples/static

test: deps browser-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest

test-compiled: deps browser-deps
	VENV=$(VENV) scripts/test-compiled

test-trixie:
	scripts/test-trixie

docs: deps
	$(VENV)/bin/sphinx-build -q -W --keep-going -b html docs docs/_build/html

# make bench: the benchmark of docs/benchmarks.rst (about an hour); bench-quick: hello only, < 3 min
bench: deps $(VENV)/.bench-installed
	$(VENV)/bin/python benchmarks/run.py

bench-quick: deps $(VENV)/.bench-installed
	$(VENV)/bin/python benchmarks/run.py --quick

$(VENV)/.bench-installed: pyproject.toml
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q wrk; }
	$(VENV)/bin/python -m pip install -q -e '.[bench]'
	touch $@

# mongrel2 and m2sh: Debian's mongrel2-core from the system's apt where it has one (Debian 12);
# else Debian 12's packages, fetched with apt into $(MONGREL2_PREFIX) (see the script).
# logrotate and curl: the tests run docs/deployment.rst's commands; iproute2 (ip): the tests
# of workers on other hosts make network namespaces
system-deps:
	@scripts/install-mongrel2 $(MONGREL2_PREFIX)
	@command -v curl >/dev/null && PATH="$$PATH:/usr/sbin:/sbin" command -v logrotate >/dev/null \
	  && PATH="$$PATH:/usr/sbin:/sbin" command -v ip >/dev/null || { \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q logrotate curl iproute2; }

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
