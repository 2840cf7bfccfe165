# make serve: venv, install, build every example and archive, start TorchServe (Ctrl-C stops it);
#             SERVE_ARGS="--free-ports" (or --model-store DIR, --workdir DIR) go to scripts/serve.py
# make test:  venv, install, unit tests and integration tests against a real TorchServe; then
#             tests/vision (TorchServe's stock vision handlers) in .venv-vision
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# torchvision needs its own torch release: the stock vision handlers' tests get a venv of their own,
# with Ray too (the stock .mar on Ray Serve, tests/vision/test_stock_on_ray.py).
VISION_VENV ?= .venv-vision
VISION_PY := $(VISION_VENV)/bin/python
VISION_INSTALLED := $(VISION_VENV)/.installed

.PHONY: serve test test-vision unit test-package archives venv vision-venv java clean bench

serve: archives java
	$(PY) -m scripts.serve $(SERVE_ARGS)

test: venv vision-venv java
	$(PY) -m pytest --ignore=tests/vision $(PYTEST_ARGS)
	$(MAKE) test-vision

# Required, not skipped: a vision venv that lacks torchvision fails the run (tests/vision/conftest.py).
test-vision: vision-venv java
	MBH_VISION_TESTS=required $(VISION_PY) -m pytest tests/vision $(PYTEST_ARGS)

unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# The Ray Serve package (python -m handlers.export_ray) in a fresh venv: pip installs ray and torch
# from its code/requirements.txt, then serve run (6.5 min on the 2-core machine, so not in make test).
test-package: venv
	MICROBATCH_PACKAGE_TEST=1 $(PY) -m pytest tests/integration/test_ray_package.py $(PYTEST_ARGS)

archives: venv
	$(PY) -m handlers.archive --model-store model_store

venv: $(INSTALLED)

# torch first, pinned to the CPU build on disk (constraints.txt); the project's own package is
# not installed: tests import it from the checkout, TorchServe only from the archives.
$(INSTALLED): pyproject.toml constraints.txt scripts/deps.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) scripts/deps.py serve ray text examples bench test > $(VENV)/requirements.txt
	$(PY) -m pip install -q -c constraints.txt -r $(VENV)/requirements.txt
	touch $@

vision-venv: $(VISION_INSTALLED)

$(VISION_INSTALLED): pyproject.toml constraints-vision.txt scripts/deps.py
	test -x $(VISION_PY) || $(PYTHON) -m venv $(VISION_VENV)
	$(VISION_PY) scripts/deps.py serve ray vision test > $(VISION_VENV)/requirements.txt
	$(VISION_PY) -m pip install -q -c constraints-vision.txt -r $(VISION_VENV)/requirements.txt
	touch $@

java:
	scripts/ensure-java.sh

clean:
	rm -rf build model_store/*.mar .serve .pytest_cache

# Benchmarks (minutes; results and tables in bench/results/). See bench/README.md.
bench: venv java
	$(PY) -m bench.inprocess --rounds 5 --warmup 3 --out bench/results
	$(PY) -m bench.overhead --out bench/results
	$(PY) -m bench.sizing --out bench/results
	$(PY) -m bench.e2e --out bench/results
