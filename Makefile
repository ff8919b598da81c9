# kdnb: every target creates .venv and installs on first use.
# The tested torch/torchvision pair is pinned in constraints.txt.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: demo demo-full test test-widgets7 test-browser test-colab lab strip check-notebooks colab-links wheel gpu-wheels clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	@echo "installing kdnb and its dependencies into $(VENV) (about two minutes the first time)"
	$(BIN)/python -m pip install --progress-bar off -c constraints.txt -e ".[notebooks,dev]" \
	  > $(VENV)/install.log 2>&1 || { tail -40 $(VENV)/install.log; exit 1; }
	$(BIN)/python -c "import torch, torchvision, segmentation_models_pytorch, kdnb; print('kdnb', kdnb.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__)"
	touch $(STAMP)

demo: $(STAMP)  ## teacher + students on SynthScenes in 15 min, prints mIoU, writes runs/demo/predictions.png
	$(BIN)/kdnb demo --out runs/demo

demo-full: $(STAMP)  ## the same with the teacher the notebooks and benchmarks share (cached for them)
	$(BIN)/kdnb demo --full --out runs/demo-full

# Two test processes (pytest-xdist), one torch thread each (tests/conftest.py): every
# test runs single-threaded, so two of them fill two cores without oversubscribing.
TEST_WORKERS ?= 2
test: $(STAMP) check-notebooks  ## every test, notebooks included
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=15

# Colab ships ipywidgets 7.7.1; .venv has the newest 8.x. This runs the notebooks, widget
# check included (tests/test_notebooks.py), and JupyterLab with its widget front end
# (tests/test_lab.py), in a second environment with 7.7.1.
IW7 := .venv-ipywidgets7
test-widgets7:  ## the notebooks and their widgets under ipywidgets 7.7.1 (Colab's version)
	test -x $(IW7)/bin/python || $(PYTHON) -m venv $(IW7)
	$(IW7)/bin/python -m pip install --progress-bar off -c constraints.txt -e ".[notebooks,dev]" \
	  "ipywidgets==7.7.1" > $(IW7)/install.log 2>&1 || { tail -40 $(IW7)/install.log; exit 1; }
	$(IW7)/bin/python -m pytest -q -s tests/test_notebooks.py tests/test_lab.py

# JupyterLab driven by headless Chromium (tests/test_browser.py): every notebook runs in quick
# mode in the browser, every interact widget is drawn and redrawn by the mouse; screenshots go
# to runs/test-browser/lab0/screenshots/ (pytest's temporary folder). Chromium and its driver
# come from the system (Debian: apt-get install chromium chromium-driver); without them the
# test skips and says so.
BROWSER_STAMP := $(VENV)/.installed-browser
$(BROWSER_STAMP): $(STAMP)
	$(BIN)/python -m pip install --progress-bar off -c constraints.txt -e ".[notebooks,dev,browser]" \
	  > $(VENV)/install-browser.log 2>&1 || { tail -40 $(VENV)/install-browser.log; exit 1; }
	touch $@

test-browser: $(BROWSER_STAMP)  ## the workbook in JupyterLab in headless Chromium, widgets moved
	mkdir -p runs
	$(BIN)/python -m pytest -q -s -m browser --basetemp=runs/test-browser tests/test_browser.py

# A Colab runtime, as far as kdnb sees it: Python 3.13 with the torch/torchvision pair and
# ipywidgets version of constraints-colab.txt, no segmentation-models-pytorch. kdnb goes in
# the way the notebooks' first cell installs an uploaded wheel (%pip install "<wheel>[notebooks]",
# without constraints, so the runtime's torch is kept: checked), then the notebooks run in
# quick mode with the widget check (tests/test_notebooks.py) in kernels of that environment.
COLAB_PYTHON ?= $(HOME)/.pyenv/versions/3.13.0/bin/python
COLAB := .venv-colab
COLAB_STAMP := $(COLAB)/.runtime
$(COLAB_STAMP): constraints-colab.txt
	rm -rf $(COLAB)
	$(COLAB_PYTHON) -m venv $(COLAB)
	@echo "installing Colab's torch pair into $(COLAB) (a large download the first time)"
	$(COLAB)/bin/python -m pip install --progress-bar off -c constraints-colab.txt torch torchvision \
	  ipywidgets ipykernel pytest nbformat nbclient > $(COLAB)/install.log 2>&1 \
	  || { tail -40 $(COLAB)/install.log; exit 1; }
	touch $@

test-colab: wheel $(COLAB_STAMP)  ## the notebooks as on Colab: Python 3.13, its torch, ipywidgets 7.7.1, kdnb from the wheel
	$(COLAB)/bin/python -m pip uninstall -y -q kdnb segmentation-models-pytorch 2>/dev/null || true
	$(COLAB)/bin/python -m pip install -q --progress-bar off "$$(ls dist/kdnb-*.whl | tail -1)[notebooks]" \
	  > $(COLAB)/install-kdnb.log 2>&1 || { tail -40 $(COLAB)/install-kdnb.log; exit 1; }
	cd notebooks && env -u PYTHONPATH ../$(COLAB)/bin/python -c "import re, kdnb, torch, torchvision, \
	  ipywidgets, segmentation_models_pytorch as smp; \
	  pins = dict(re.findall(r'^([a-z]+)==(\S+)', open('../constraints-colab.txt').read(), re.M)); \
	  got = {'torch': torch.__version__.split('+')[0], 'torchvision': torchvision.__version__.split('+')[0], \
	         'ipywidgets': ipywidgets.__version__}; \
	  assert got == pins, f'the runtime changed: {got}, pinned {pins}'; \
	  assert 'site-packages' in kdnb.__file__, kdnb.__file__; \
	  print('kdnb', kdnb.__version__, 'from', kdnb.__file__, '|', got, '| smp', smp.__version__)"
	env -u PYTHONPATH $(COLAB)/bin/python -m pytest -q -s -p no:cacheprovider tests/test_notebooks.py

lab: $(STAMP)  ## JupyterLab on the workbook
	$(BIN)/jupyter lab notebooks/

strip: $(STAMP)  ## remove notebook outputs before committing
	$(BIN)/nbstripout notebooks/*.ipynb 2>/dev/null || true

colab-links:  ## point every Colab badge and install cell at REPO=owner/name
	@test -n "$(REPO)" || { echo "usage: make colab-links REPO=owner/name [BRANCH=main]"; exit 2; }
	$(PYTHON) notebooks/colab_links.py "$(REPO)" --branch "$(or $(BRANCH),main)"

wheel: $(STAMP)  ## dist/kdnb-*.whl, to upload to a Colab runtime (its install cell finds it)
	$(BIN)/python -m pip wheel --no-deps --no-build-isolation -w dist . > $(VENV)/wheel.log 2>&1 \
	  || { tail -20 $(VENV)/wheel.log; exit 1; }
	@ls dist/kdnb-*.whl

# What benchmarks/gpu_check.sh installs on the GPU machine, which has no network: its own
# python3 holds torch, torchvision, timm, huggingface_hub and safetensors but not
# segmentation-models-pytorch. The versions are .venv's; timm goes to fallback/, installed
# there only if missing. .whl/ is git-ignored and travels as the device call's carry.
GPU_WHEELS := .whl
GPU_PIP := $(BIN)/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --progress-bar off -q
version = $$($(BIN)/python -c "import importlib.metadata as m; print(m.version('$(1)'))")
gpu-wheels: $(STAMP)  ## .whl/: the wheels benchmarks/gpu_check.sh needs on the GPU machine
	rm -f $(GPU_WHEELS)/segmentation_models_pytorch-*.whl $(GPU_WHEELS)/fallback/timm-*.whl
	$(GPU_PIP) -d $(GPU_WHEELS) "segmentation-models-pytorch==$(call version,segmentation-models-pytorch)"
	$(GPU_PIP) -d $(GPU_WHEELS)/fallback "timm==$(call version,timm)"
	@ls -l $(GPU_WHEELS)/*.whl $(GPU_WHEELS)/fallback/*.whl

check-notebooks: $(STAMP)
	@if ls notebooks/*.ipynb >/dev/null 2>&1; then $(BIN)/nbstripout --verify notebooks/*.ipynb \
	  || { echo "notebooks have stored outputs: run 'make strip'"; exit 1; }; fi

clean:
	rm -rf $(VENV) $(IW7) $(COLAB) runs .pytest_cache kdnb.egg-info dist build
