# Every target sets up what it needs: a virtualenv in .venv with the build
# tools, the test tools and kvarena itself, built in place; the bench
# targets add the bench's tools (plots, BLAS thread control).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kvarena-installed
BENCH_STAMP := $(VENV)/.kvarena-bench-tools

.PHONY: install test test-debug bench bench-quick memory ops streaming clean

$(STAMP): pyproject.toml setup.py pyx/_arena.pyx pyx/kernel.h pyx/kernel_variants.h pyx/kernel_impl.h pyx/pool.h
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "setuptools>=64" wheel "cython>=3.0" "numpy>=1.25" \
	    pytest hypothesis memory-profiler
	# editable_mode=compat: a plain .pth entry for this directory; the default
	# mode warns on every build that same-named folders may shadow the package
	$(PY) -m pip install --quiet --no-build-isolation --editable . \
	    --config-settings editable_mode=compat
	touch $(STAMP)

# the bench extra of pyproject.toml, less what $(STAMP) already installed
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet matplotlib threadpoolctl
	touch $(BENCH_STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# the whole suite against an extension built with bounds checks on, then
# the release build back in place
test-debug: $(STAMP)
	KVARENA_CYTHON_DEBUG=1 $(PY) -m pip install --quiet --no-build-isolation --editable . \
	    --config-settings editable_mode=compat
	$(PY) -c "import kvarena._arena as a; assert a.BOUNDSCHECK, 'debug build expected'"
	$(PY) -m pytest -q; status=$$?; \
	$(PY) -m pip install --quiet --no-build-isolation --editable . \
	    --config-settings editable_mode=compat && exit $$status

# the main job: bench/generation.py, kernel.py, update.py, quality.py, then plot.py
bench: $(BENCH_STAMP)
	$(PY) bench/sweep.py

bench-quick: $(BENCH_STAMP)
	$(PY) bench/sweep.py --quick

memory: $(STAMP)
	$(PY) bench/memory.py

ops: $(STAMP)
	$(PY) bench/ops.py

streaming: $(STAMP)
	$(PY) bench/streaming.py

clean:
	rm -rf $(VENV) build *.egg-info kvarena/*.so .pytest_cache
