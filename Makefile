# qforge — the two commands a new user needs:
#   make demo   install what is missing, build, run the embedded default (pretrain -> eval -> sample)
#   make test   install what is missing, build, run every test (exits non-zero on any failure)
# Also: make setup | build | bench | clean | fresh-check (both commands on a fresh clone, empty caches)
#       make fuzz   every libFuzzer target (tests/fuzz/) for 10^6 inputs, corpora kept in build/fuzz/
SHELL := /bin/bash
JOBS ?= $(shell nproc)
BUILD ?= build
export CCACHE_BASEDIR ?= $(CURDIR)
export CCACHE_SLOPPINESS := pch_defines,time_macros,include_file_mtime,include_file_ctime
export CCACHE_MAXSIZE ?= 5G
export PATH := $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda/bin:,)$(PATH)

.PHONY: setup build demo test bench fuzz clean fresh-check

setup:
	@scripts/setup.sh

$(BUILD)/CMakeCache.txt: CMakeLists.txt | setup
	@TORCH_PREFIX=$$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)') && \
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$TORCH_PREFIX" -DTORCH_CUDA_ARCH_LIST=9.0 \
	  -DCMAKE_CUDA_COMPILER=$$(command -v nvcc || echo /usr/local/cuda/bin/nvcc) \
	  -DPython_EXECUTABLE=$(CURDIR)/.venv/bin/python > $(BUILD).configure.log 2>&1 || \
	  { cat $(BUILD).configure.log; exit 1; }

build: setup $(BUILD)/CMakeCache.txt
	@cmake --build $(BUILD) -j $(JOBS)

demo: build
	@scripts/demo.sh

test: build
	@cd $(BUILD) && ctest --output-on-failure -j $(JOBS) --timeout 1200

bench: build
	@bench/train_throughput.sh
	@bench/qlora_step.sh
	@bench/hf_load.sh
	@bench/export_gguf.sh
	@bench/ptq_quality.sh

# Each target: name:seed dir. The corpus grows across runs in $(BUILD)/fuzz/<name>.corpus; a crash
# leaves its input as $(BUILD)/fuzz/<name>-crash-* and stops here. ASan records no allocation stacks
# (malloc_context_size=0): storing one per malloc took 60% of fuzz_yaml_recipe's time (yaml-cpp
# allocates per node) and grew its RSS towards the limit; rerun a saved crash input without it for
# the full report (e.g. build/fuzz/fuzz_yaml_recipe build/fuzz/fuzz_yaml_recipe-crash-...).
FUZZ_TARGETS := fuzz_safetensors:tests/fuzz/seeds fuzz_tokenizer_json:tests/fuzz/seeds_tokenizer \
  fuzz_yaml_recipe:tests/fuzz/seeds_yaml fuzz_hf_config:tests/fuzz/seeds_hf_config \
  fuzz_gguf:tests/fuzz/seeds_gguf
fuzz: build
	@for t in $(FUZZ_TARGETS); do \
	  name=$${t%%:*}; seeds=$${t#*:}; mkdir -p $(BUILD)/fuzz/$$name.corpus; \
	  echo "== $$name: 10^6 inputs (corpus $(BUILD)/fuzz/$$name.corpus, seeds $$seeds)"; \
	  ASAN_OPTIONS=malloc_context_size=0 $(BUILD)/fuzz/$$name -runs=1000000 -timeout=5 -rss_limit_mb=2048 -print_final_stats=1 \
	    -artifact_prefix=$(BUILD)/fuzz/$$name- $(BUILD)/fuzz/$$name.corpus $$seeds 2>&1 | \
	    grep -E '^(Done|stat::|==[0-9]+==|SUMMARY|INFO: (Seed|Loaded))|crash-' ; \
	  [ $${PIPESTATUS[0]} -eq 0 ] || { echo "make fuzz: $$name failed (input saved under $(BUILD)/fuzz/)"; exit 1; }; \
	done

fresh-check:
	@scripts/fresh_check.sh

clean:
	rm -rf $(BUILD) $(BUILD).configure.log
