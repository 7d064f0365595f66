# The README's two commands: `make demo` (set up, generate demo data, train every bundle at demo scale, sample,
# evaluate, write demo/report.md) and `make test` (set up, run the test suite). Both work on a fresh machine with
# only Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed first so the project's `torch>=` range is already met and pip does not pull a multi-GB CUDA build on
# CPU machines; on a GPU machine use e.g. `make demo TORCH=torch` to let pip choose the CUDA build.
TORCH ?= torch==2.13.0
# CPU threads per run; OpenMP spin-waiting on busy small machines makes more threads much slower.
THREADS ?= 1
export OMP_NUM_THREADS ?= $(THREADS)
export OMP_WAIT_POLICY ?= PASSIVE
export MEDGEN_NUM_THREADS ?= $(THREADS)

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: setup
	$(PY) -m tools.run_demo --out demo

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf demo .pytest_cache
