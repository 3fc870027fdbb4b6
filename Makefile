# ws3d: make install | test | demo | preprocess DATASET=... | pretrain | finetune | bench | bench-accuracy | gpu-check
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WS3D := $(BIN)/ws3d
DATA ?= data
DATASET ?= synthetic
RAW ?= $(DATA)/$(DATASET)_raw
STORE ?= $(DATA)/$(DATASET).zarr
RUN ?= runs/$(DATASET)
DEMO_SCALE ?= 1
ARGS ?=
EXECUTOR ?=
WORKFLOW ?= $(or $(if $(EXECUTOR),$(wildcard workflows/$(DATASET).$(EXECUTOR).yaml)),workflows/$(DATASET).yaml)

.PHONY: install test test-slow demo preprocess pretrain finetune bench bench-accuracy gpu-check clean

install: $(VENV)/.installed

# libusb-1.0-0 is the one system library Open3D needs to import; installed when root and missing.
$(VENV)/.installed: pyproject.toml
	@if ! ldconfig -p 2>/dev/null | grep -q libusb-1.0.so.0; then \
	  if [ "$$(id -u)" = 0 ]; then (apt-get install -y -q libusb-1.0-0 >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && apt-get install -y -q libusb-1.0-0 >/dev/null)); \
	  else echo "Open3D needs libusb-1.0-0: run 'sudo apt-get install libusb-1.0-0'"; exit 1; fi; fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

test: install
	$(BIN)/pytest -q

test-slow: install
	$(BIN)/pytest -q -m slow

demo: install
	$(WS3D) demo --out $(DATA)/demo --scale $(DEMO_SCALE) $(ARGS)

# On this machine by default; EXECUTOR=slurm|pbs takes workflows/$(DATASET).$(EXECUTOR).yaml when there is
# one, else workflows/$(DATASET).yaml with executor.kind=$(EXECUTOR).
preprocess: install
	$(WS3D) preprocess --workflow $(WORKFLOW) raw=$(RAW) store=$(STORE) $(if $(EXECUTOR),executor.kind=$(EXECUTOR)) $(ARGS)

pretrain: install
	$(WS3D) pretrain --store $(STORE) --out $(RUN)/pretrain $(ARGS)

finetune: install
	$(WS3D) finetune --store $(STORE) --init $(RUN)/pretrain --out $(RUN)/finetune $(ARGS)

bench: install
	$(WS3D) bench --out $(DATA)/bench.json $(ARGS)

bench-accuracy: install
	$(WS3D) demo --out $(DATA)/bench_accuracy --scale $(DEMO_SCALE) --ablation $(ARGS)

# The prepared GPU check (README "GPU"): <= 8 minutes on one GPU, one JSON file. No `install`
# prerequisite: a GPU image whose python3 already holds torch runs it as is (GPU_PYTHON=...).
GPU_CHECK_OUT ?= $(DATA)/gpu_check.json
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_PYTHON) -m ws3d_train.bench.gpu_check --out $(GPU_CHECK_OUT) $(ARGS)

clean:
	rm -rf $(DATA)/demo $(DATA)/bench_accuracy
