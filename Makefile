# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is installed first and pinned, so pip never resolves a multi-GB CUDA build on a CPU box.
TORCH  := torch==2.13.0
PORT   ?= 8000

.PHONY: install install-test demo sst2 ner dialogue test bench clean

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

# The classical baselines of the task recipes; seqeval ships only as a source that needs setuptools-scm
# to build, and the project is (re)built without isolation, as above.
$(VENV)/.installed-baselines: $(VENV)/.installed
	$(BIN)/pip install --quiet setuptools-scm
	$(BIN)/pip install --quiet --no-build-isolation -e '.[baselines]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

## demo: install, prepare the bundled Shakespeare, train ~3 minutes on the CPU, print samples, serve
demo: install
	$(BIN)/gptstack train --config configs/demo.yaml --resume false
	$(BIN)/gptstack generate --checkpoint runs/demo/best --prompt "ROMEO:" --max-new-tokens 120 --seed 1 --temperature 0.8
	$(BIN)/gptstack generate --checkpoint runs/demo/best --prompt "First Citizen:" --max-new-tokens 120 --seed 2 --temperature 0.8
	$(BIN)/gptstack serve --checkpoint runs/demo/best --model-name shakespeare --port $(PORT)

## sst2: the fine-tuning recipe: pretrain the demo model (if not done), fine-tune SST-2, evaluate on a
## held-out test split beside a TF-IDF + logistic-regression baseline on the same split
sst2: install $(VENV)/.installed-baselines
	test -f runs/demo/result.json || $(BIN)/gptstack train --config configs/demo.yaml   # resumes a stopped demo run
	$(BIN)/gptstack finetune --config configs/sst2.yaml
	$(BIN)/gptstack eval --checkpoint runs/sst2/best --data runs/sst2/splits/test.jsonl --report runs/sst2/report.html
	$(BIN)/python bench/sst2_baseline.py --run runs/sst2

## ner: pretrain the demo model (if not done), fine-tune a WNUT 2017 tagger, evaluate it on dev beside a CRF
WNUT := src/gptstack/assets/wnut17
ner: install $(VENV)/.installed-baselines
	test -f runs/demo/result.json || $(BIN)/gptstack train --config configs/demo.yaml
	$(BIN)/gptstack finetune --task token_classification --init_from runs/demo/best --out_dir runs/ner \
	    --data $(WNUT)/train.conll --eval_data $(WNUT)/dev.conll --word_features 131072 --token_crf true \
	    --max_steps 600 --learning_rate 1e-3 --best_metric f1_micro
	$(BIN)/gptstack eval --checkpoint runs/ner/best --data $(WNUT)/dev.conll --report runs/ner/report.html
	$(BIN)/python bench/ner_baseline.py --checkpoint runs/ner/best

## dialogue: the multi-turn recipe: pretrain the demo model (if not done), fine-tune it on the bookshop
## conversations; then `gptstack serve --checkpoint runs/dialogue/best` (README: A multi-turn assistant)
dialogue: install
	test -f runs/demo/result.json || $(BIN)/gptstack train --config configs/demo.yaml
	$(BIN)/gptstack finetune --config configs/dialogue.yaml

## test: install with test extras and run the whole suite
test: install-test
	$(BIN)/python -m pytest -q

## bench: training throughput table (see docs/benchmarks.md)
bench: install-test
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) runs
