# Two commands set up a fresh machine and run everything: `make demo`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned, so pip never resolves a different (multi-GB) build. Override on your cluster:
#   make demo TORCH_SPEC="torch==2.5.1 torchvision==0.20.1"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
WORKDIR ?= out/demo
export HF_HUB_OFFLINE ?= 1
export PYTHONHASHSEED := 0

.PHONY: venv demo test bench clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# open_clip's training reader needs its own pin (webdataset<=0.2.86; it fails on newer webdataset): a side venv
# that sees the main venv's packages through a .pth file and shadows only webdataset, for one test.
OPEN_CLIP_VENV ?= .venv-open-clip-train
$(OPEN_CLIP_VENV)/.installed: $(VENV)/.installed
	test -x $(OPEN_CLIP_VENV)/bin/python || $(PY) -m venv $(OPEN_CLIP_VENV)
	$(PY) -c "import site; print(site.getsitepackages()[0])" > $$($(OPEN_CLIP_VENV)/bin/python -c "import site; print(site.getsitepackages()[0])")/main_venv.pth
	$(OPEN_CLIP_VENV)/bin/python -m pip install -q --no-deps "webdataset==0.2.86"
	touch $@

demo: venv
	$(VENV)/bin/synpref demo --workdir $(WORKDIR)

test: venv $(OPEN_CLIP_VENV)/.installed
	SYNPREF_OPEN_CLIP_TRAIN_PYTHON=$(OPEN_CLIP_VENV)/bin/python $(PY) -m pytest -q -n 2 --dist loadgroup tests   # two workers: the 2-core CI machine; tests are single-threaded

bench: venv
	$(PY) bench/bench_stages.py

clean:
	rm -rf out .pytest_cache
