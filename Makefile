PY := .venv/bin/python
GAME ?= BankHeist

.PHONY: setup demo evidence test test-slow bench params
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
