# One command to set up and run the demo, one to set up and run the tests (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= $(abspath ../shared/data)
export ICLDISTILL_DATA ?= $(DATA)
# The CPU wheel of torch sits on this machine's disk; elsewhere pip fetches the same version.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test test-fast demo demo-small bench study study-gsm8k clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# Lint first (rules in pyproject.toml [tool.ruff]): a finding fails the target before the tests run.
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The demo: does context distillation work? The Qwen2.5-Coder pair (1.5B teacher with 16 demonstrations -> 0.5B
# student without them) on binarised MNLI, 100 queries, one seed: 4 runs into runs/demo, then the report, whose
# first screen (printed here) gives CD against the zero-shot and the ICL student with paired 95% intervals.
# About 20 minutes on 2 CPU cores from a fresh machine (the pair's ~1.6 GB download and conversion included;
# README and BENCHMARKS.md give the measured times). Progress bars off (-q): the sweep prints one line per run.
demo: setup
	$(VENV)/bin/icld models fetch qwen2.5-coder-1.5b qwen2.5-coder-0.5b
	$(VENV)/bin/icld -q sweep configs/demo-zeroshot.yaml
	$(VENV)/bin/icld -q sweep configs/demo.yaml
	$(VENV)/bin/icld report runs/demo
	@sed -n '/^## What was found/,/^## What ran/p' runs/demo/report/report.md | sed '$$d'

# The earlier demo on the small offline pair (Gemma-3-270M -> SmolLM2-135M; near chance on NLI, so only the
# mechanism shows): MNLI -> HANS, SST-2 and AG News, 28 runs, about 12 minutes on 2 CPU cores.
demo-small: setup
	$(VENV)/bin/icld models fetch smollm2-135m gemma3-270m
	$(VENV)/bin/icld -q sweep configs/demo-small.yaml
	$(VENV)/bin/icld -q sweep configs/demo-sst2.yaml
	$(VENV)/bin/icld -q sweep configs/demo-agnews.yaml
	$(VENV)/bin/icld report runs/demo-small
	$(VENV)/bin/icld report runs/demo-sst2
	$(VENV)/bin/icld report runs/demo-agnews

# The reference study on the Qwen2.5-Coder pair (RESULTS.md): 22 runs on MNLI -> HANS from four experiment
# files into one sweep directory (the teacher's PBFT last), then 13 on SST-2 into another. Resumable: run it
# again after an interruption and it continues where it stopped. STUDY_DIR and SST2_DIR move its output.
STUDY_DIR ?= runs/study-qwen
SST2_DIR ?= runs/study-qwen-sst2
study: setup
	$(VENV)/bin/icld models fetch qwen2.5-coder-1.5b qwen2.5-coder-0.5b
	$(VENV)/bin/icld -q sweep configs/study-qwen-zeroshot.yaml --output-dir $(STUDY_DIR)
	$(VENV)/bin/icld -q sweep configs/study-qwen.yaml --output-dir $(STUDY_DIR)
	$(VENV)/bin/icld -q sweep configs/study-qwen-labelfree.yaml --output-dir $(STUDY_DIR)
	$(VENV)/bin/icld -q sweep configs/study-qwen-teacher-pbft.yaml --output-dir $(STUDY_DIR)
	$(VENV)/bin/icld report $(STUDY_DIR)
	$(VENV)/bin/icld -q sweep configs/study-qwen-sst2-zeroshot.yaml --output-dir $(SST2_DIR)
	$(VENV)/bin/icld -q sweep configs/study-qwen-sst2.yaml --output-dir $(SST2_DIR)
	$(VENV)/bin/icld report $(SST2_DIR)

# The GSM8K generation study on the same pair (RESULTS.md): ICL teacher and student, the student without context,
# SFT on references and the three distillation signals, 3 seeds, in one sweep directory. Resumable, like `study`.
GSM8K_DIR ?= runs/study-gsm8k
study-gsm8k: setup
	$(VENV)/bin/icld models fetch qwen2.5-coder-1.5b qwen2.5-coder-0.5b
	$(VENV)/bin/icld -q sweep configs/study-gsm8k-zeroshot.yaml --output-dir $(GSM8K_DIR)
	$(VENV)/bin/icld -q sweep configs/study-gsm8k.yaml --output-dir $(GSM8K_DIR)
	$(VENV)/bin/icld report $(GSM8K_DIR)

# Every benchmark, at the sizes BENCHMARKS.md reports (about an hour on 2 CPU cores). vs_lmeval creates
# lm-eval's own virtual environment on first use; paper_scale saves two random OPT models (about 6 GB).
# A benchmark exits non-zero when its results disagree with the reference (not when it is merely slow).
bench: setup
	$(PY) benchmarks/icl_prefix_cache.py --shots 2,8,16,32 --queries 64 --batch-size 16 --repeats 5
	$(PY) benchmarks/train_cost.py --shots 2,8,32
	$(PY) benchmarks/gen_train_memory.py --student qwen2.5-coder-0.5b --batch 8 --steps 2
	$(PY) benchmarks/pair_cost.py --shots 16 --queries 8 --naive-queries 1 --train-batch 4 --repeats 3
	$(PY) benchmarks/paper_scale.py --shots 2,8,32 --steps 3 --queries 4
	$(PY) benchmarks/vs_lmeval.py --shots 16 --queries 200 --dtypes fp32,bf16

clean:
	rm -rf $(VENV) .pytest_cache
