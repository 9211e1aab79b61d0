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

# On demand only (never part of `make test`). Quick variants by default; BENCH_FULL=1 runs the realistic-size
# scenario on the whole 512x512x300 series (64 tiles, mirroring on and off: hours on a CPU) and the many-class one
# at full size. bench/gpu_check.sh is the GPU counterpart.
bench: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[bench]"
	$(PY) bench/bench_dicom.py --slices 300 --repeat 3
	$(PY) bench/bench_seg.py
	$(PY) bench/bench_engine.py --scenario demo-clinical
	$(PY) bench/bench_engine.py --scenario medium-net
	$(PY) bench/bench_engine.py --scenario realistic $(if $(BENCH_FULL),,--tiles 2)
	$(PY) bench/bench_engine.py --scenario many-class --mirroring off $(if $(BENCH_FULL),,--shape 60 320 320)

clean:
	rm -rf $(VENV) out .pytest_cache
