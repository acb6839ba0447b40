# ulite-monai: one-command set-up, demo and tests.
#
#   make demo    # set up .venv, then train the bundle on the embedded demo data and run inference
#   make test    # set up .venv (+ system tools + MONAI Label venv), then run the whole test suite
#
# Pick another torch (e.g. a CUDA build) with TORCH, e.g.
#   make demo TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126'
# The default is the CPU build (no multi-GB CUDA download).

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH       ?= torch==2.13.0
EXTRAS      ?= all
PYTEST_ARGS ?=
# system tools the tests use (Debian names): DICOM validator, DICOM toolkit, PACS with DICOMweb
APT_PACKAGES ?= dicom3tools dcmtk orthanc orthanc-dicomweb openssl
# UTF-8 I/O whatever the machine's locale (torch.compile reads UTF-8 templates with the locale's codec)
export PYTHONUTF8 = 1

.PHONY: setup kernels test-kernels demo test test-fast sysdeps bench gpu-check clean help

help:
	@echo "make demo | make test | make test-fast | make bench | make gpu-check | make label-server | make clean"

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first and alone, so the project's 'torch>=2.4' keeps this build
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -c "import torch, monai, ulite_monai; print('venv ready: torch', torch.__version__, 'monai', monai.__version__)"
	touch $@

# the fused CPU training kernels (ulite_monai/networks/cpu_kernels.py): compiled once per machine and venv into
# PyTorch's extension cache (about 45 s), here rather than inside the first training run; a no-op when cached. A
# machine without a C++ compiler gets a warning and trains with PyTorch's stock operators.
kernels: setup
	-$(PY) -m ulite_monai.networks.build_kernels

demo: setup kernels
	$(PY) -m ulite_monai.demo

# Debian packages some integration tests need; installed only where missing (root or sudo).
sysdeps:
	@missing=""; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	command -v dcmdump >/dev/null || missing="$$missing dcmtk"; \
	command -v Orthanc >/dev/null || missing="$$missing orthanc"; \
	ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so >/dev/null 2>&1 || missing="$$missing orthanc-dicomweb"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	if [ -n "$$missing" ]; then \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  echo "installing:$$missing"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  $$SUDO systemctl stop orthanc >/dev/null 2>&1 || $$SUDO service orthanc stop >/dev/null 2>&1 || true; \
	fi

test: setup sysdeps label-venv test-kernels
	$(PY) -m pytest tests $(PYTEST_ARGS)

# the kernels for both environments the tests use (the Label server's runs ulite_monai too), one compiler each,
# side by side; a no-op for an environment whose build is cached
test-kernels: setup label-venv
	@$(PY) -m ulite_monai.networks.build_kernels & pid=$$!; \
	$(LABEL_PY) -m ulite_monai.networks.build_kernels || true; wait $$pid || true

# unit tests only (no slow integration tests, no MONAI Label server)
test-fast: setup kernels
	$(PY) -m pytest tests -m "not slow and not label" $(PYTEST_ARGS)

bench: setup
	$(PY) -m ulite_monai.bench

# CUDA tests + the GPU benchmark, time-boxed (docs/benchmarks/gpu/README.md); DEVICE=cpu QUICK=1 for a dry run
gpu-check: setup
	PYTHON=$(PY) bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) $(LABEL_VENV) .pytest_cache bundles/ulite/models/*.pt bundles/ulite/eval bundles/ulite/runs bundles/ulite/dataset

include mk/label.mk
