# MONAI Label server for U-Lite: its own virtual environment and a start target.
# Included by the top-level Makefile; every variable can be overridden, e.g.
#   make label-server LABEL_STUDIES=/data/ct LABEL_PORT=8001
#   make label-server LABEL_STUDIES=http://127.0.0.1:8042/dicom-web
#   make label-venv LABEL_TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126'
#
# monailabel 0.8.5 needs numpy<2 and pydicom<3 and its inference breaks with monai 1.6, so the server does not
# share the project's environment. ulite_monai is installed editable (--no-deps) so the app uses this tree.

LABEL_PYTHON_BASE ?= python3
LABEL_VENV        ?= .venv-label
LABEL_PY          := $(LABEL_VENV)/bin/python
LABEL_TORCH       ?= torch==2.13.0
LABEL_REQS        ?= requirements-label.txt
LABEL_HOST        ?= 127.0.0.1
LABEL_PORT        ?= 8000
LABEL_STUDIES     ?=
LABEL_CONF        ?=

.PHONY: label-venv label-server label-test

label-venv: $(LABEL_VENV)/.installed

$(LABEL_VENV)/.installed: $(LABEL_REQS) pyproject.toml
	$(LABEL_PYTHON_BASE) -m venv $(LABEL_VENV)
	@# torch first and alone, so that the requirements below keep this (CPU) build
	$(LABEL_PY) -m pip install -q $(LABEL_TORCH)
	$(LABEL_PY) -m pip install -q -r $(LABEL_REQS)
	@# PyPI's torchvision is a CUDA build whose ops cannot load next to the CPU torch, and then it breaks every
	@# `import torchvision`; nothing the app runs needs it (monai imports it optionally), so it goes.
	$(LABEL_PY) -m pip uninstall -q -y torchvision
	$(LABEL_PY) -m pip install -q --no-deps -e .
	$(LABEL_PY) -c "import monailabel, monai, ulite_monai.label.lib.infers; print('label venv: monailabel', monailabel.__version__, 'monai', monai.__version__)"
	touch $@

label-server: label-venv
	@# the fused CPU kernels for this environment, before the server starts (a no-op when cached)
	-$(LABEL_PY) -m ulite_monai.networks.build_kernels
	$(LABEL_PY) -m ulite_monai.label.serve --host $(LABEL_HOST) --port $(LABEL_PORT) \
		$(if $(LABEL_STUDIES),--studies $(LABEL_STUDIES)) $(LABEL_CONF)

# the Label integration tests only (they need the venv; Orthanc ones need `apt-get install orthanc orthanc-dicomweb`)
label-test: label-venv
	.venv/bin/pytest -m label tests/
