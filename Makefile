# Kimad's entry points. On a fresh machine:
#   make demo   set everything up (venv, torch, Horovod, kimad._C) and run the short end-to-end comparison
#   make test   set everything up and run the whole test suite (pytest + CTest, sanitizers, CUDA compile check)
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

VENV   ?= $(CURDIR)/.venv
PY     := $(VENV)/bin/python
# The venv brings ninja (and cmake finds it there) even where the system has none.
export PATH := $(VENV)/bin:$(PATH)
NP     ?= 2
CMAKE_BUILD := build/cmake
ASAN_BUILD  := build/cmake-asan

.PHONY: help setup cxx-deps test test-python test-cxx lint demo bench clean

help:
	@echo "make demo        set up, then run the short end-to-end comparison (emulated 2-node cluster; report in runs/demo/)"
	@echo "make test        set up, then run pytest and the C++ tests (plain + ASan/UBSan) and the CUDA compile check"
	@echo "make setup       create $(VENV) and install torch, Horovod 0.28.1 (cached build) and kimad (editable)"
	@echo "make lint        ruff check (style, pyflakes, import order, bugbear; pyproject.toml)"
	@echo "make bench       kernel microbenchmarks (ratios against baselines measured in the same run)"
	@echo "make clean       remove build outputs (keeps the venv and the Horovod wheel cache)"

setup:
	@KIMAD_VENV=$(VENV) bash scripts/bootstrap.sh

# GoogleTest for the C++ unit tests: Debian's libgtest-dev (installed when missing and we are root).
cxx-deps:
	@if [ ! -f /usr/include/gtest/gtest.h ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "[make] installing libgtest-dev for the C++ unit tests"; \
	    (apt-get install -y -qq libgtest-dev >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null && apt-get install -y -qq libgtest-dev >/dev/null)); \
	  else echo "[make] error: the C++ tests need GoogleTest: apt-get install libgtest-dev (as root)" >&2; exit 1; fi; \
	fi

test: setup cxx-deps
	@$(MAKE) --no-print-directory test-python test-cxx

test-python: lint
	$(PY) -m pytest

lint:
	$(PY) -m ruff check .

test-cxx:
	cmake -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build $(CMAKE_BUILD)
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure
	cmake -S . -B $(ASAN_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Debug -DKIMAD_SANITIZE=ON -DKIMAD_CUDA_CHECK=OFF >/dev/null
	cmake --build $(ASAN_BUILD)
	ctest --test-dir $(ASAN_BUILD) --output-on-failure
	@rc=0; bash scripts/check_cuda_bindings.sh $(PY) || rc=$$?; \
	  if [ $$rc = 2 ]; then echo "[make] CUDA branches of the bindings not checked: no CUDA headers"; \
	  elif [ $$rc != 0 ]; then exit $$rc; fi

# The short end-to-end comparison (about 4 minutes on 2 cores): 2 emulated nodes (root) on the step-down
# trace, uncompressed vs static top-k 0.01 vs Kimad+; without root it says so and runs on localhost.
DEMO_OUT ?= runs/demo
demo: setup
	@echo "[demo] DigitsCNN on the MNIST digits, 2 Horovod ranks (Gloo): none vs static top-k 0.01 + EF vs Kimad+"
	@echo "[demo] emulated cluster, step-down trace 100 -> 20 Mbit/s (localhost without shaping when not root)"
	$(PY) benchmarks/e2e.py --quick --nodes $(NP) --trace step-down --rate 100 --out $(DEMO_OUT)
	@echo "[demo] report: $(DEMO_OUT)/report.md (plots beside it)"

bench: setup
	$(PY) benchmarks/kernels.py

clean:
	rm -rf build kimad/_C*.so
