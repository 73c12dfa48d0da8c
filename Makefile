# make all COMP=NAME     every stage of configs/NAME.yaml, skipping the up-to-date ones
# make STAGE COMP=NAME   one stage (and what it needs)      make status COMP=NAME
# make test              the default test suite (what CI runs)
# ARGS passes extra kp options, e.g. make all COMP=statefarm ARGS="--config configs/offline/statefarm.yaml"
COMP ?= digits
ARGS ?=
PYTHON ?= $(shell command -v python3.11 || command -v python3)
# TensorFlow's flavour: gpu where an NVIDIA GPU answers nvidia-smi, else cpu (TF=cpu|gpu overrides it)
TF ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
VENV := .venv
KP := $(VENV)/bin/kp
STAGES := $(sort $(basename $(notdir $(wildcard stages/[a-z]*.py))))  # one target per stage module
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: all test test-all status clean bench kaggle-local browser sandbox tensorboard $(STAGES)

all: $(VENV)/.installed
	$(KP) all --comp $(COMP) $(ARGS)

$(STAGES): $(VENV)/.installed
	$(KP) $@ --comp $(COMP) $(ARGS)

status: $(VENV)/.installed
	$(KP) status --comp $(COMP) $(ARGS)

clean: $(VENV)/.installed
	$(KP) clean --comp $(COMP) $(ARGS)

test: $(VENV)/.installed browser sandbox
	$(VENV)/bin/python -m pytest -m "not slow" --durations=15 -n 2 --dist loadfile --no-loadscope-reorder $(ARGS)

test-all: $(VENV)/.installed browser sandbox
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder $(ARGS)

# Headless Chromium from Debian's packages, for the tests marked `browser` (kp report rendered in a real
# browser); they skip with the reason where it cannot be installed (no apt-get, not root, no package index).
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
	  && echo "installed $$(chromium --version)"; } || echo "chromium could not be installed: the browser tests will skip"

# bubblewrap from Debian's packages: the local Kaggle server's kernel sandbox (a private view of the machine, no
# network, its own process namespace). Without it kernels run unconfined and the sandbox tests skip, saying so.
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
	  && echo "installed $$(bwrap --version)"; } || echo "bubblewrap could not be installed: kernels run unconfined"

# TensorBoard over every training's curves (work/COMP/_tensorboard/STORE/KEY/), installed on first use: kp never needs it
tensorboard: $(VENV)/.installed
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[tensorboard]'
	$(VENV)/bin/tensorboard --logdir $(or $(WORK),work)/$(COMP)/_tensorboard --host 127.0.0.1

bench: $(VENV)/.installed
	$(VENV)/bin/python bench/cli_startup.py

# A local Kaggle-compatible server over ../shared/data/competitions (KAGGLE_LOCAL_DATA, KAGGLE_LOCAL_PORT):
# downloads, uploads, scoring; uploads and submission logs in work/kaggle-local (KAGGLE_LOCAL_LOG).
# It prints the export lines that point the kaggle client, and so the pipeline, at it.
kaggle-local: $(VENV)/.installed
	$(VENV)/bin/python -m pipeline.kaggle.local

# The virtual environment, created on first use and refreshed when pyproject.toml changes; TensorFlow as
# TF says (the other flavour's wheel is removed first: both install the same `tensorflow` package).
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip uninstall --quiet --yes $(if $(filter gpu,$(TF)),tensorflow-cpu,tensorflow) >/dev/null 2>&1 || true
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,ray,$(TF)]'
	# KerasHub (precompute.backbone hub:PRESET) without its declared dependencies: they pin tensorflow-text (the
	# full TensorFlow wheel, which would replace tensorflow-cpu) and kagglehub's kagglesdk 0.1.28 (the kaggle
	# client needs 0.1.37+); loading a saved preset folder needs neither (pyproject lists what it does need)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps 'keras-hub==0.32.0'
	echo $(TF) > $@
