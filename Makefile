# Two commands do all the set-up on a fresh machine:
#   make run    creates .venv, installs graft, runs the whole pipeline on the embedded defaults
#   make test   same set-up, then the test suite (what CI runs)
VENV ?= .venv
PYTHON ?= python3
# The CPU build by default; set TORCH_SPEC (e.g. "torch==2.13.0 --index-url ...cu128") for a GPU build.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.graft-installed

.PHONY: setup run test lint lock

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, so the project's torch range is already met and no CUDA build is pulled in
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/graft run

test: $(STAMP)
	$(VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Refresh the pinned set after changing dependencies (torch is installed separately).
lock:
	$(PY) -m pip freeze --exclude-editable | grep -viE '^(torch|nvidia-|triton|graft)' > requirements.lock
