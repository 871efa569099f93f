# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is installed first and pinned, so pip never resolves a multi-GB CUDA build on a CPU box.
TORCH  := torch==2.13.0
PORT   ?= 8000

.PHONY: install install-test demo sst2 test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The decode kernels (csrc/) compile against the installed torch: torch and the build tools first, then
# the project without build isolation (an isolated build has no torch and would leave the kernels out).
$(VENV)/.installed: $(BIN)/python pyproject.toml setup.py $(wildcard csrc/*)
	$(BIN)/pip install --quiet $(TORCH) 'setuptools>=68' wheel
	$(BIN)/pip install --quiet --no-build-isolation -e .
	touch $@

# The test extras build in isolation (llama-cpp-python brings its own build tools), which rebuilds
# gptstack without torch: build it once more with the kernels.
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

## demo: install, prepare the bundled Shakespeare, train ~3 minutes on the CPU, print samples, serve
demo: install
	$(BIN)/gptstack train --config configs/demo.yaml --resume false
	$(BIN)/gptstack generate --checkpoint runs/demo/best --prompt "ROMEO:" --max-new-tokens 120 --seed 1 --temperature 0.8
	$(BIN)/gptstack generate --checkpoint runs/demo/best --prompt "First Citizen:" --max-new-tokens 120 --seed 2 --temperature 0.8
	$(BIN)/gptstack serve --checkpoint runs/demo/best --model-name shakespeare --port $(PORT)

## sst2: the fine-tuning recipe: pretrain the demo model (if not done), fine-tune SST-2, evaluate
sst2: install
	test -f runs/demo/result.json || $(BIN)/gptstack train --config configs/demo.yaml   # resumes a stopped demo run
	$(BIN)/gptstack finetune --config configs/sst2.yaml
	$(BIN)/gptstack eval --checkpoint runs/sst2/best --data runs/sst2/splits/val.jsonl --report runs/sst2/report.html

## test: install with test extras and run the whole suite
test: install-test
	$(BIN)/python -m pytest -q

## bench: training throughput table (see docs/benchmarks.md)
bench: install-test
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) runs
