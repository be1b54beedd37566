# One-command set-up: `make demo` and `make test` create .venv and install everything first
# (steph with its test extras and the optional Ray extra, so that the Ray tests run too).
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch from this machine's wheel cache; override e.g. TORCH="torch==2.5.1" on a GPU box.
TORCH  ?= torch==2.13.0
OUT    ?= demo-out
PYTEST_ARGS ?=

.PHONY: install test test-slow demo bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[dev,ray]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/steph demo --out $(OUT)

bench: install
	$(PY) benchmarks/bench_loading.py
	$(PY) benchmarks/bench_abmil.py
	$(PY) benchmarks/bench_steph.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
