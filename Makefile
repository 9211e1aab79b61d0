VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[app,package,test]"
	touch $(STAMP)

# Runs both variants on a freshly generated phantom study with the bundled demo model.
demo: $(STAMP)
	$(VENV)/bin/segmap demo --out out/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[bench]"
	$(PY) bench/bench_dicom.py --slices 300 --repeat 3
	$(PY) bench/bench_engine.py --scenario demo-clinical
	$(PY) bench/bench_engine.py --scenario medium-net

clean:
	rm -rf $(VENV) out .pytest_cache
