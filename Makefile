# tokenbench: `make run` and `make test` each set everything up themselves.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
FMNIST  := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
# torch/torchvision pair known to import together on the project's machines
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# A machine without CUDA (no nvidia-smi, no /dev/nvidia*) installs the pins' CPU builds (about
# 1 GB instead of 6) from CPU_TORCH_INDEX when it is set, e.g.
# `make setup CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu`.  It is empty by default: the
# package index the project's machines reach serves no CPU torchvision (its only CPU torch,
# 2.13.0+cpu from a local wheel, fails `import torchvision` beside PyPI's torchvision 0.28.0, and
# no 2.14.1+cpu is served), so there the CUDA build installs as before.
CPU_TORCH_INDEX ?=
HAS_CUDA ?= $(shell (command -v nvidia-smi || ls /dev/nvidia*) >/dev/null 2>&1 && echo yes)
TORCH_INDEX := $(if $(CPU_TORCH_INDEX),$(if $(HAS_CUDA),,--index-url $(CPU_TORCH_INDEX)))

.PHONY: run reference reference-hierarchical test setup data browser docs bench bench-gpu visuals clean

# Your run of the default sweep: runs/default/ (git-ignored); matching reference records are reused.
# On a CPU other than the reference's it times a few settings (time_by_default in the sweep file);
# RUN_ARGS=--all-timings times all, RUN_ARGS=--no-reference-timings ignores the reference's timings.
RUN_ARGS ?=
run: setup data
	$(BIN)/tokenbench run $(RUN_ARGS)

# The project's reference results (README, docs/reference.md) (maintainers, on an idle machine).
reference: setup data
	$(BIN)/tokenbench run default --all-timings --out results/default

# The hierarchical sweep's reference (DynamicCNN on the embedded ConvNeXt; docs/hierarchical.md).
reference-hierarchical: setup data
	$(BIN)/tokenbench run hierarchical --out results/hierarchical

# The suite in parallel, one process per CPU (pytest-xdist; each test runs one torch thread):
# about half the wall time on a 2-core machine.  TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= auto
test: setup data browser
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

bench: setup
	$(BIN)/python bench.py

# The GPU check, on a CUDA machine's own python3 and offline (../shared/gpu-wheels/README.md:
# `cp -r ../shared/gpu-wheels .gpu-wheels` first, here): fvcore and its dependencies from those
# wheels, the GPU-marked tests, then bench_gpu.py's plan within ten minutes in all (eager fp16 of
# every method, CUDA graphs, ViT-B/L with ToMe, compiled if time remains), ending with the cells
# not reached and why -> results/bench-gpu/DATE-TIME/bench-gpu.md (bench-gpu.sh; BENCH_GPU_DRYRUN=1
# runs the plan on the CPU).
bench-gpu:
	GPU_PY=$(or $(GPU_PY),python3) ./bench-gpu.sh

# The token visualisations in results/figures/ (docs/ shows them): one sheet per method, then
# every method at two thirds of the dense FLOPs; DynamicViT with its trained predictors.
DVIT07  := results/dynamicvit-0.7/model.pt
visuals: setup data
	for m in none topk random evit; do $(BIN)/tokenbench visualize default --method $$m --out results/figures/tokens_$$m.png; done
	$(BIN)/tokenbench visualize default --method tome --set r=3 --out results/figures/tokens_tome.png
	$(BIN)/tokenbench visualize default --method dynamicvit --set keep_rate=0.7 --checkpoint $(DVIT07) --out results/figures/tokens_dynamicvit.png
	$(BIN)/tokenbench visualize default --compare dynamicvit,tome,evit,topk,random --flops 0.66 \
		--checkpoint dynamicvit=$(DVIT07) --out results/figures/compare_matched_flops.png
	$(BIN)/tokenbench visualize default-convnext --method dynamicvit --set keep_rate=0.7 \
		--checkpoint results/dynamicvit-convnext-0.7/model.pt --out results/figures/tokens_dynamicvit_convnext.png

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>/dev/null || true
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_INDEX) $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

# Fashion-MNIST from Debian's package where apt exists; otherwise tokenbench falls back
# to --data-dir or a torchvision download.
data:
	@if [ ! -f $(FMNIST) ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) \
		|| echo "warning: could not install dataset-fashion-mnist; pass --data-dir"; \
	fi

# The documentation site into site/ (git-ignored): first the FLOPs on DeiT-S of any method whose
# code changed (docs/method_flops.json), then mkdocs, which fails on a broken link or a missing page.
docs: setup
	$(BIN)/python docs/gen_method_flops.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# Chromium for the test that opens report.html headless (skipped without it), from Debian's
# package where apt exists.
browser:
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
		(apt-get install -y -qq chromium >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null)) \
		|| echo "warning: could not install chromium; the report's browser test is skipped"; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis site
