PY := .venv/bin/python
GAME ?= BankHeist

.PHONY: setup demo evidence test test-slow bench params kernels
setup: .venv/.installed
.venv/.installed: pyproject.toml constraints.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(PY) experiments/train.py --game=$(GAME) --preset=demo

# Evidence run: preset `short`, seeds 0-2 as separate processes; rerun to resume. Writes results/short/$(GAME).json.
evidence: setup
	$(PY) experiments/evidence.py --game=$(GAME)

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile tests

test-slow: setup
	$(PY) -m pytest -q -m slow tests

bench: setup
	$(PY) benchmarks/run.py --json

params: setup
	$(PY) experiments/params.py

# What the loop's programs launch on an H100, compiled here without a GPU (benchmarks/kernels.py): jax's CUDA
# plugin for this jax, in .cuda-aot/ (~180 MB download, not in the venv: the CPU runs never see it).
kernels: setup .cuda-aot/.installed
	@PYTHONPATH=.cuda-aot $(PY) benchmarks/kernels.py
.cuda-aot/.installed: .venv/.installed
	V=$$($(PY) -c 'import jax; print(jax.__version__)') && $(PY) -m pip install -q --no-deps --target .cuda-aot \
	    "jax-cuda12-plugin==$$V" "jax-cuda12-pjrt==$$V"
	touch $@
