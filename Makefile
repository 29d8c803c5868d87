# Two commands a newcomer needs:
#   make demo   set up, then run the main job (train the default model, sample, evaluate)
#   make test   set up a virtual environment from nothing and run the whole test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup test demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# the CPU wheel of torch first: any other spec pulls a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,likelihood,serve]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

# trains the default preset (rectified flow on the embedded Fashion-MNIST subset, ~5 min on a
# 2-core CPU) into a new run folder, then scores 1000 samples against the test split
demo: $(STAMP)
	@run=fmnist-rf-$$(date +%Y%m%d-%H%M%S); \
	$(BIN)/scorelab train --name $$run && \
	$(BIN)/scorelab eval runs/$$run --n 1000 && \
	echo "samples: runs/$$run/samples.png  loss curve: runs/$$run/loss.png"

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/samplers.py

clean:
	rm -rf $(VENV) build *.egg-info
