# `make test` / `make demo` / `make bench` each build a fresh virtual environment (build/venv-<target>)
# from the pinned versions (requirements.lock). torch==2.13.0 is installed first: it is the CPU build,
# any other version would pull gigabytes of CUDA wheels. For day-to-day work, `make install` keeps one
# venv (.venv) and only reinstalls when pyproject.toml or requirements.lock change; `make test-fast`
# runs the suite in it without the tests marked slow; `make lint` is ruff, as CI runs it.
# The suite runs on PYTEST_WORKERS processes (pytest-xdist, one test file per worker at a time:
# module fixtures stay shared); PYTEST_WORKERS=0 runs it in this process. PYTEST_FLAGS adds options
# (.ci/run passes --durations=15).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
PIP_FLAGS ?= -q --disable-pip-version-check
VENV ?= .venv
PYTEST_WORKERS ?= 2
PYTEST_FLAGS ?=
PYTEST = -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_FLAGS)

# $(1): venv dir; $(2): extras ("[test]" or ""); $(3): "torch" to install the CPU torch and cn_clip
define install_into
	$(PYTHON) -m venv $(1)
	$(if $(3),$(1)/bin/pip install $(PIP_FLAGS) torch==2.13.0)
	$(1)/bin/pip install $(PIP_FLAGS) -c requirements.lock -e ".$(2)"
	$(if $(3),$(1)/bin/pip install $(PIP_FLAGS) --no-deps cn-clip==1.6.0)
endef

.PHONY: test test-fast lint install demo bench api
test:
	rm -rf build/venv-test
	$(call install_into,build/venv-test,[test],torch)
	build/venv-test/bin/ruff check .
	build/venv-test/bin/ruff format --check .
	# the page test drives Debian's headless Chromium; installed here when missing (root + apt-get)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver fonts-wqy-microhei) || echo "chromium not installed: tests/serve/test_page.py will skip"
	build/venv-test/bin/python $(PYTEST) tests

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml requirements.lock
	$(call install_into,$(VENV),[test],torch)
	touch $@

test-fast: install
	$(VENV)/bin/python $(PYTEST) -m "not slow" tests

# The compiled-step contracts for NVIDIA GPUs (tests/training/test_compile.py with the CUDA plugin); the TPU
# ones run in `make test` (libtpu is in [test]). Separate: the CUDA plugin is another ~0.5 GB that
# every jax process of the suite would probe at start-up, and its compiles are the slowest.
.PHONY: test-gpu-compile
test-gpu-compile:
	rm -rf build/venv-gpu-compile
	$(call install_into,build/venv-gpu-compile,[test,cuda-compile],torch)
	build/venv-gpu-compile/bin/python -m pytest -q tests/training/test_compile.py

# The API reference (pdoc, from the docstrings) into build/api; fails on a broken cross-reference.
api: install
	$(VENV)/bin/python docs/build_api.py build/api

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The demo needs neither torch nor the test tools.
demo:
	rm -rf build/venv-demo
	$(call install_into,build/venv-demo,,)
	build/venv-demo/bin/python -m train --config train/configs/demo.py --workdir build/demo

# The CPU benchmarks with the default allocator, then (where libjemalloc2 is installed) with
# jemalloc retaining freed memory, the allocator the README recommends for JAX on CPU.
JEMALLOC ?= /usr/lib/x86_64-linux-gnu/libjemalloc.so.2
bench:
	rm -rf build/venv-bench
	$(call install_into,build/venv-bench,[test],torch)
	build/venv-bench/bin/python bench/compare_torch.py
	build/venv-bench/bin/python bench/train_memory.py
	if [ -f $(JEMALLOC) ]; then LD_PRELOAD=$(JEMALLOC) MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 \
	  build/venv-bench/bin/python bench/compare_torch.py; \
	else echo "$(JEMALLOC) not found: no jemalloc run (apt-get install libjemalloc2)"; fi
