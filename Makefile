# refloop: two commands on a fresh machine — `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-sqlite test-pg lint install bench clean screenshots

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	@echo "Dashboard: http://127.0.0.1:8575/ui/   first admin: $(BIN)/refloop users add NAME --role admin --state state"
	$(BIN)/refloop run --routes routes.yaml --state state

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

# the Twilio contract mock (prism) is an npm package, installed from tests/node's lock file
tests/node/node_modules/.bin/prism: tests/node/package.json tests/node/package-lock.json
	npm ci --prefix tests/node --no-audit --no-fund
	touch $@

# the dashboard's browser test drives Debian's chromium (Playwright with executable_path)
/usr/bin/chromium:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

# the suite on SQLite, then every test that uses the store (marker `store`) again on
# PostgreSQL, each store in a schema of its own (docs/scale-out.md, "Tests on both"); the
# machine runs PostgreSQL on 5432. The whole suite runs on PostgreSQL too
# (REFLOOP_TEST_STORE=$(PG_TEST_STORE) .venv/bin/pytest), but the tests without the marker
# never open a store: CI runs them once, on SQLite.
PG_TEST_STORE ?= postgresql://postgres@127.0.0.1:5432/test

#
# The two halves run at once: the suite waits on sockets, fsyncs and daemons far more
# than it computes (the PostgreSQL half: 15.5 min of wall time for 7 min of CPU), so on
# two cores they take about as long together as the longer one alone. Each half's output
# is printed as a whole when it ends (--output-sync); each exits non-zero on a failure.
test: lint tests/node/node_modules/.bin/prism /usr/bin/chromium
	$(MAKE) --jobs=2 --output-sync=target test-sqlite test-pg

test-sqlite: $(STAMP)
	REFLOOP_REQUIRE_BROWSER=1 $(BIN)/pytest

test-pg: $(STAMP)
	REFLOOP_TEST_STORE=$(PG_TEST_STORE) $(BIN)/pytest -m store -p no:cacheprovider

# every dashboard page at 1280 and 390 px wide, to docs/screenshots/ (tests/screenshots.py)
screenshots: $(STAMP) /usr/bin/chromium
	$(BIN)/python tests/screenshots.py docs/screenshots

bench: $(STAMP)
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
