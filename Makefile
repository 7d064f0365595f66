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

.PHONY: setup demo test clean system-tools test-monailabel

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: setup
	$(PY) -m tools.run_demo --out demo

# Debian tools the DICOM and PACS tests run against (dicom3tools' dciodvfy, Orthanc with DICOMweb); installed when
# missing and apt-get can (as root, e.g. in CI); without them those tests skip and say why.
DEBIAN_TEST_TOOLS ?= dicom3tools orthanc orthanc-dicomweb
system-tools:
	@command -v dciodvfy >/dev/null && command -v Orthanc >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DEBIAN_TEST_TOOLS) >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DEBIAN_TEST_TOOLS) >/dev/null 2>&1; }; }; } || \
	  echo "note: $(DEBIAN_TEST_TOOLS) not installed; the DICOM validation and PACS tests will skip"

test: setup system-tools
	$(PY) -m pytest -q

# MONAI Label is optional and gets its own environment: monailabel needs torchvision, so a torch build that has one
# (on x86_64 torch 2.14.1 + torchvision 0.29.1 lie on this disk; about 5.5 GB). Its SAM2 dependency is built against
# that torch (no build isolation, no CUDA extension), so pip does not fetch another torch for the build; its
# DICOM-SEG writer (pydicom-seg) still needs pydicom 2.
ML_VENV ?= .venv-monailabel
ML_TORCH ?= torch==2.14.1 torchvision==0.29.1
$(ML_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(ML_VENV)
	$(ML_VENV)/bin/python -m pip install --quiet $(ML_TORCH) setuptools wheel
	SAM2_BUILD_CUDA=0 $(ML_VENV)/bin/python -m pip install --quiet --no-build-isolation -e ".[test]" "monailabel==0.8.5" "pydicom<3"
	touch $@

test-monailabel: $(ML_VENV)/.installed
	$(ML_VENV)/bin/python -m pytest -q tests/test_monailabel.py

clean:
	rm -rf demo .pytest_cache
