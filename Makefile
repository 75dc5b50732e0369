PY := .venv/bin/python
GAME ?= BankHeist

.PHONY: setup demo evidence test test-slow bench params kernels wheels
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

# The wheels benchmarks/device_check.sh installs on a bare accelerator machine without network (x86-64, the device
# image's Python 3.12): EnvPool's and tensorboardX's import-time needs, and EnvPool slimmed to its Atari family with
# the ROMs inside (benchmarks/README.md, "Preparing the wheels"). ~5 MB in wheels/, ignored by git; carried to the
# device as run(..., carry=["wheels"]).
WHEEL_TARGET := --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64
wheels: setup
	rm -rf wheels && tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	$(PY) -m pip download -q --no-deps $(WHEEL_TARGET) -d wheels tensorboardX==2.6.5 dm-env==1.6 dm-tree==0.1.10 \
	    gymnasium==1.4.0 farama-notifications==0.0.6 optree==0.20.0 && \
	$(PY) -m pip download -q --no-deps $(WHEEL_TARGET) -d $$tmp envpool==1.2.5 envpool-assets==0.3.0 && \
	$(PY) benchmarks/device_check.py slim-envpool $$tmp/envpool-1.2.5-*.whl $$tmp/envpool_assets-0.3.0-*.whl \
	    --out wheels && ls wheels && du -sh wheels
