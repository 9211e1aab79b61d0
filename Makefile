VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-model test test-fast generate bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[app,package,test]"
	touch $(STAMP)

# Runs both variants on a freshly generated phantom study with the bundled demo model.
demo: $(STAMP)
	$(VENV)/bin/segmap demo --out out/demo

# Retrains the bundled demo model from phantoms (minutes on a CPU); see src/segmap/demo/model/README.md.
demo-model: $(STAMP)
	PYTHONPATH=tools $(PY) -m segmap_tools.train --out models/demo-spleen/model.ts

# Every tier: unit, end to end (app and CLI), Docker images, fidelity against nnunetv2.
test: $(STAMP)
	$(PY) -m pytest -q tests

# The fast tier: plain functions only (under a minute).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m unit tests

# Rewrite the files derived from src/segmap/settings.py (app/app.yaml, the README settings table).
generate: $(STAMP)
	$(PY) tools/generate.py

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[app,bench]"
	$(PY) bench/bench_dicom.py --slices 300 --repeat 3
	$(PY) bench/bench_engine.py --scenario demo-clinical
	$(PY) bench/bench_engine.py --scenario medium-net

clean:
	rm -rf $(VENV) out .pytest_cache
