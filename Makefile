# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false

.PHONY: run test lint install clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch alone first, so nothing else can pick a CUDA build.
	$(PY) -m pip install --quiet --no-compile torch==2.13.0
	$(PY) -m pip install --quiet --no-compile -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	# The libraries' bytecode, compiled on every core at once: pip compiles one file at a time (on 2 cores
	# the install took 141 s, 66 s this way). Imports need it where PYTHONDONTWRITEBYTECODE is set, as on
	# the CI machines: without it every process compiles torch, diffusers and gradio again (14 s -> 26 s).
	# A few library files need a newer Python and fail to compile, here as under pip: hence `|| true`.
	$(PY) -m compileall -qq -j 0 $(VENV)/lib || true
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) app.py

# The suite's budget is 15 minutes on a 2-core machine: the slowest tests are listed after each run.
# Each test runs torch on one thread (tests/conftest.py). Three workers on two cores: a worker often
# waits (on a browser, on a server or a subprocess importing torch), and the third keeps both cores busy
# (the same tree, ten minutes apart: 894 s with two workers, 635 s with three). A file stays on one
# worker, so its module fixtures (tiny models, served apps) are built once; files go out in conftest's
# order (the long ones first), not xdist's (the most tests first).
test: $(STAMP)
	$(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder --durations=15

# ruff check (pyproject.toml; TID251 keeps gradio out of the engine) and ruff format, checked.
lint: $(STAMP)
	$(PY) -m ruff check sdlora tests app.py bench
	$(PY) -m ruff format --check sdlora tests app.py bench

clean:
	rm -rf $(VENV) .pytest_cache
