VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-model test test-fast generate bench bench-service bench-portal service-image stack-images stack-up stack-down clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[app,package,service,portal,test]"
	$(PY) -m pip install -q --no-deps monailabel==0.8.5 monet-bundle==1.3  # their clients only (portal tests)
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

# Rewrite the generated files: app/app.yaml and the README settings table (src/segmap/settings.py), app/requirements.txt
# (pyproject.toml), docs/service-settings.md (the service configuration's declarations).
generate: $(STAMP)
	$(PY) tools/generate.py

# On demand only (never part of `make test`). Quick variants by default; BENCH_FULL=1 runs the realistic-size
# scenario on the whole 512x512x300 series (64 tiles, mirroring on and off: hours on a CPU) and the many-class one
# at full size. bench/gpu_check.sh is the GPU counterpart.
# The engine's candidates (bench/bench_engine.py --help): exact, the fast path with and without OpenVINO, and int8
# (measured, never offered by the engine: it missed the fidelity bar; docs/performance.md).
BENCH_CANDIDATES ?= exact,fast,fast+openvino,fast+int8
bench: $(STAMP)
	$(PY) -m pip install -q -e ".[app,bench]"
	$(PY) bench/bench_dicom.py --slices 300 --repeat 3
	$(PY) bench/bench_seg.py
	$(PY) bench/bench_engine.py --scenario demo-clinical --precision $(BENCH_CANDIDATES)
	$(PY) bench/bench_engine.py --scenario medium-net --precision $(BENCH_CANDIDATES)
	$(PY) bench/bench_engine.py --scenario realistic $(if $(BENCH_FULL),,--tiles 2) --precision $(BENCH_CANDIDATES)
	$(PY) bench/bench_engine.py --scenario many-class --mirroring off $(if $(BENCH_FULL),,--shape 60 320 320)

# The portal's warm latencies beside the network time, a cold `segmap run` and a cold `docker run` of the MAP.
bench-portal: $(STAMP)
	$(PY) bench/bench_portal.py

# The job service's overhead and throughput (real segmap serve, MAP image, Orthanc; PostgreSQL for the workers).
bench-service: $(STAMP)
	$(PY) bench/bench_service.py --slots 1 2
	$(PY) bench/bench_service.py --workers 1 2 3

# The job service's own image (segmap serve) on the MAPs' base image; BASE_IMAGE=... for a registry's image.
SERVICE_TAG ?= segmap/service:0.1.0
service-image: $(STAMP)
	$(PY) -m segmap.packager.service_image --tag $(SERVICE_TAG) $(if $(BASE_IMAGE),--base-image $(BASE_IMAGE),)

# The one-machine stack (deploy/compose/): Orthanc and the OHIF viewer from Debian/npm on the local base image, the
# service image, then `docker-compose up -d`. The MAPs it runs are named in deploy/compose/segmap.yaml.
COMPOSE := docker-compose -f deploy/compose/docker-compose.yml
OHIF_VERSION := 3.13.2
stack-images: service-image
	cd deploy/compose/viewer && test -f ohif-app-$(OHIF_VERSION).tgz || npm pack @ohif/app@$(OHIF_VERSION)
	$(COMPOSE) build orthanc viewer

stack-up: stack-images
	DOCKER_GID=$$(stat -c %g /var/run/docker.sock) $(COMPOSE) up -d

stack-down:
	$(COMPOSE) down

clean:
	rm -rf $(VENV) out .pytest_cache
