# Each target builds a fresh virtual environment (build/venv-<target>), installs the pinned
# dependencies (requirements.lock) and runs. torch==2.13.0 is installed first: it is the CPU
# build, and any other version would pull gigabytes of CUDA wheels.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
PIP_FLAGS ?= -q --disable-pip-version-check

define fresh_venv
	rm -rf build/venv-$(1)
	$(PYTHON) -m venv build/venv-$(1)
	build/venv-$(1)/bin/pip install $(PIP_FLAGS) torch==2.13.0
	build/venv-$(1)/bin/pip install $(PIP_FLAGS) -c requirements.lock -e ".[test]"
	build/venv-$(1)/bin/pip install $(PIP_FLAGS) --no-deps cn-clip==1.6.0
endef

.PHONY: test demo bench
test:
	$(call fresh_venv,test)
	build/venv-test/bin/python -m pytest -q tests

demo:
	$(call fresh_venv,demo)
	build/venv-demo/bin/python -m train --config train/configs/demo.py --workdir build/demo

# The CPU benchmarks with the default allocator, then (where libjemalloc2 is installed) with
# jemalloc retaining freed memory, the allocator the README recommends for JAX on CPU.
JEMALLOC ?= /usr/lib/x86_64-linux-gnu/libjemalloc.so.2
bench:
	$(call fresh_venv,bench)
	build/venv-bench/bin/python bench/compare_torch.py
	build/venv-bench/bin/python bench/train_memory.py
	if [ -f $(JEMALLOC) ]; then LD_PRELOAD=$(JEMALLOC) MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 \
	  build/venv-bench/bin/python bench/compare_torch.py; \
	else echo "$(JEMALLOC) not found: no jemalloc run (apt-get install libjemalloc2)"; fi
