# excb: build the CPU reference, its tests and the benchmarks.
#   make            build ./excb
#   make data       copy the embedded default data set (Fashion-MNIST, Debian) into data/
#   make test       build and run the Criterion suites (fast unit suites, then the step suites)
#   make check      what CI runs: make test, ASan+UBSan and TSan runs, a short fuzz of the readers
#   make bench      ./excb bench for the two configurations of issue 2
#   make bench-data the loader's throughput (issue 3)
# Optional features are probed and announced; without them the build degrades, never silently:
#   oneDNN (libdnnl-dev)  the fast GEMM; without it the naive GEMM is used (correct, ~50x slower)
#   OpenMP                threads; results are bitwise the same for any thread count
# `make` alone builds ./excb (the data rule below would otherwise be the first target)
.DEFAULT_GOAL := all
CC      ?= gcc
# -ffp-contract=off: every a*b+c in the source rounds twice, as written (no silent FMA contraction);
# and no fast-math flags: IEEE semantics (subnormals, NaN checks, the fp16 rounding of A4) are part of the method.
CFLAGS  ?= -O3 -march=native
# -Wno-format-truncation: paths are cut at 4 KiB by snprintf on purpose (and such a path then fails to open)
CFLAGS  += -std=c11 -Wall -Wextra -Wno-unknown-pragmas -Wno-format-truncation -ffp-contract=off -fopenmp
LDLIBS  += -lm -fopenmp -lpthread -lz -lpng -ljpeg

ifneq ($(EXCB_NO_DNNL),1)
HAVE_DNNL := $(shell echo '\#include <dnnl.h>' | $(CC) -E - >/dev/null 2>&1 && echo 1)
endif
ifeq ($(HAVE_DNNL),1)
  CFLAGS += -DEXCB_USE_DNNL
  LDLIBS += -ldnnl
  $(info ✓ oneDNN found: dnnl_sgemm is the GEMM)
else
  $(info ✗ oneDNN not found: naive GEMM (slow). Install: apt-get install libdnnl-dev)
endif
HAVE_CRITERION := $(shell pkg-config --exists criterion 2>/dev/null && echo 1)

# The GPU path (excb_kernels.cu): built whenever nvcc, cuBLAS and cuDNN are found (CUDA_HOME), also on
# machines without a GPU; the binary then runs on the CPU and says so. EXCB_CPU_ONLY=1 skips it.
# -fmad=false: no silent FMA contraction in the kernels either (cuBLAS and cuDNN keep their own).
# Code for sm_80 (A100) and sm_90 (H100/H200), plus PTX of compute_90 for newer GPUs. cudart is linked
# statically; cuBLAS and cuDNN are found at run time through the rpath or LD_LIBRARY_PATH.
CUDA_HOME ?= /usr/local/cuda
NVCC      ?= $(CUDA_HOME)/bin/nvcc
NVCCFLAGS ?= -O3 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=[sm_90,compute_90]
NVCCFLAGS += -std=c++17 -fmad=false -Xcompiler -Wall,-Wno-unknown-pragmas
ifneq ($(EXCB_CPU_ONLY),1)
HAVE_CUDA := $(shell test -x $(NVCC) && test -f $(CUDA_HOME)/include/cublas_v2.h && test -f $(CUDA_HOME)/include/cudnn.h \
               && ls $(CUDA_HOME)/lib64/libcudnn.so $(CUDA_HOME)/lib64/libcublas.so >/dev/null 2>&1 && echo 1)
endif
ifeq ($(HAVE_CUDA),1)
  CUDA_OBJ := excb_kernels.o
  CFLAGS += -DEXCB_CUDA
  LDLIBS += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcudnn -lcublas -lcudart_static -ldl -lrt -lstdc++
  $(info ✓ CUDA found: $(shell $(NVCC) --version | tail -1), cuBLAS and cuDNN in $(CUDA_HOME): the GPU path is built)
else
  ifeq ($(EXCB_CPU_ONLY),1)
    $(info ✗ CUDA path not built (EXCB_CPU_ONLY=1): CPU only)
  else
    $(info ✗ CUDA path not built (needs nvcc, cublas_v2.h, cudnn.h and their libraries in CUDA_HOME=$(CUDA_HOME)): CPU only)
  endif
endif

excb_kernels.o: excb_kernels.cu excb.h
	$(NVCC) $(NVCCFLAGS) -DEXCB_CUDA -c -o $@ excb_kernels.cu

TESTS := tests/test_gpu tests/test_equations tests/test_gradients tests/test_whole_model_f64 tests/test_step \
         tests/test_data tests/test_views tests/test_train tests/test_train_e2e

.PHONY: all check test test-fast test-step bench bench-compare fixture parity-peer clean data golden \
        fuzz fuzz-build test-asan test-tsan bench-data

# The embedded default data set: Fashion-MNIST from the Debian package dataset-fashion-mnist, copied
# (still gzipped, 30 MB) into data/fashion-mnist, where `--data fashion-mnist` finds it.
FMNIST_SRC ?= /usr/share/datasets/fashion-mnist
FMNIST_FILES := train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz
data: $(addprefix data/fashion-mnist/,$(FMNIST_FILES))
data/fashion-mnist/%.gz:
	@test -f $(FMNIST_SRC)/$*.gz || { echo "missing $(FMNIST_SRC)/$*.gz: apt-get install dataset-fashion-mnist" >&2; exit 66; }
	mkdir -p data/fashion-mnist
	cp $(FMNIST_SRC)/$*.gz $@.tmp && mv $@.tmp $@
all: excb

excb: excb.c excb.h $(CUDA_OBJ)
	$(CC) $(CFLAGS) -o $@ excb.c $(CUDA_OBJ) $(LDLIBS)

# the whole implementation compiled without main, for the tests
excb_test.o: excb.c excb.h
	$(CC) $(CFLAGS) -DTESTING -c -o $@ excb.c

# the same source in float64 (real = double, naive GEMM), for whole-network finite differences
excb_f64.o: excb.c excb.h
	$(CC) $(CFLAGS) -UEXCB_CUDA -DTESTING -DEXCB_REAL_DOUBLE -c -o $@ excb.c

tests/test_whole_model_f64: tests/test_whole_model_f64.c tests/testutil.h excb_f64.o
	$(CC) $(CFLAGS) -UEXCB_CUDA -DEXCB_REAL_DOUBLE $(shell pkg-config --cflags criterion) -I. -o $@ $< excb_f64.o $(shell pkg-config --libs criterion) $(LDLIBS)

tests/%: tests/%.c tests/testutil.h excb_test.o $(CUDA_OBJ)
ifneq ($(HAVE_CRITERION),1)
	$(error Criterion not found: apt-get install libcriterion-dev pkg-config)
endif
	$(CC) $(CFLAGS) $(shell pkg-config --cflags criterion) -I. -o $@ $< excb_test.o $(CUDA_OBJ) $(shell pkg-config --libs criterion) $(LDLIBS)

# everything CI runs: the suites, the data/view suites under ASan+UBSan, the loader's threads under
# ThreadSanitizer, a short fuzz of every reader
check: test test-asan test-tsan fuzz

test: test-fast test-step
test-fast: tests/test_equations tests/test_gradients tests/test_whole_model_f64 tests/test_data tests/test_views \
           tests/test_train tests/test_gpu excb
	./tests/test_equations
	./tests/test_gradients
	./tests/test_whole_model_f64
	./tests/test_data
	./tests/test_views
	./tests/test_train
	@# the GPU suite: each test says SKIP and why when this build or machine has no GPU (--verbose shows it)
	@bash -c 'set -o pipefail; ./tests/test_gpu --verbose 2>&1 | grep -E "SKIP|FAIL|CRASH|Synthesis|gpu-vs"'
# the slower suites: whole training steps, and whole runs of the binary (resume, kill -9, divergence)
test-step: tests/test_step tests/test_train_e2e excb
	./tests/test_step
	./tests/test_train_e2e

bench: excb
	./excb bench --config resnet20s --global-size 28 --local-size 12 --batch 256 --K 4096
	./excb bench --config resnet18 --global-size 32 --local-size 16 --batch 64 --K 4096

# the same-run comparison with the PyTorch peer (issue 2's figures); needs python3-torch
bench-compare: excb
	/usr/bin/python3 bench/compare.py

# regenerate the float64 parity fixtures (needs python3-torch; CI never does this)
fixture:
	/usr/bin/python3 tests/reference/make_fixture.py
	/usr/bin/python3 tests/reference/make_fixture.py --yardstick

# one step against the second, independent reference: ../shared/bench/torch_excb.py --dump
PEER ?= ../shared/bench/torch_excb.py
parity-peer: tests/test_step
	/usr/bin/python3 $(PEER) --dump /tmp/excb_torch_dump.bin
	EXCB_TORCH_DUMP=/tmp/excb_torch_dump.bin ./tests/test_step --filter 'parity/*'

# the view operators' golden outputs from PIL and torchvision (needs python3-pil, -numpy, -torch)
golden:
	/usr/bin/python3 tests/reference/make_view_golden.py

# The data and view suites under AddressSanitizer and UndefinedBehaviorSanitizer (gcc; no oneDNN,
# so the sanitizers see every instruction). The CLI test inside test_data uses the normal ./excb.
ASAN := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1
test-asan: excb
	$(CC) -std=c11 -Wall -Wextra -Wno-unknown-pragmas -Wno-format-truncation -ffp-contract=off -fopenmp $(ASAN) -DTESTING -c -o excb_asan.o excb.c
	for t in test_data test_views test_equations; do \
	  $(CC) -std=c11 -ffp-contract=off -fopenmp $(ASAN) $(shell pkg-config --cflags criterion) -I. -o tests/$$t.asan tests/$$t.c excb_asan.o \
	    $(shell pkg-config --libs criterion) -lm -fopenmp -lpthread -lz -lpng -ljpeg || exit 1; \
	  ASAN_OPTIONS=detect_leaks=1 LSAN_OPTIONS=suppressions=tests/lsan.supp ./tests/$$t.asan --jobs 1 || exit 1; \
	done

# The loader's threads under ThreadSanitizer. Criterion's runner does not run under TSan, so a plain
# driver (tests/tsan_loader.c) exercises 1-4 workers, resume, a bad file and the skip path.
test-tsan:
	$(CC) -std=c11 -Wno-unknown-pragmas -Wno-format-truncation -ffp-contract=off -fsanitize=thread -g -O1 -DTESTING -c -o excb_tsan.o excb.c
	$(CC) -std=c11 -ffp-contract=off -fsanitize=thread -g -O1 -I. -o tests/tsan_loader tests/tsan_loader.c excb_tsan.o -lm -lpthread -lz -lpng -ljpeg
	./tests/tsan_loader > tests/tsan_loader.log 2>&1 || { cat tests/tsan_loader.log; exit 1; }
	tail -1 tests/tsan_loader.log

# libFuzzer targets, one per reader/decoder (tests/fuzz/fuzz_readers.c). `make fuzz` first replays the
# kept regression inputs, then fuzzes each target for FUZZ_SECONDS from the seed corpus (the corpus
# grows in a scratch copy, never in the repository). Crashes land in tests/fuzz/crash-*.
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 20
FUZZ_TARGETS := idx image cifar stl
FUZZ_FLAGS   := -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -DTESTING
FUZZ_BINS    := $(addprefix tests/fuzz/fuzz_,$(FUZZ_TARGETS))
fuzz-build: $(FUZZ_BINS)
$(FUZZ_BINS): tests/fuzz/fuzz_%: tests/fuzz/fuzz_readers.c excb.c excb.h
	$(FUZZ_CC) $(FUZZ_FLAGS) -DFUZZ_$$(echo $* | tr a-z A-Z) -I. -o $@ tests/fuzz/fuzz_readers.c excb.c -lz -lpng -ljpeg -lm -lpthread
fuzz: fuzz-build
	@for t in $(FUZZ_TARGETS); do \
	  work=$$(mktemp -d); \
	  if ls tests/fuzz/regressions/$$t/* >/dev/null 2>&1; then \
	    ./tests/fuzz/fuzz_$$t -malloc_limit_mb=8 tests/fuzz/regressions/$$t/* > $$work/replay.log 2>&1 || { cat $$work/replay.log; exit 1; }; \
	    echo "fuzz $$t: replayed $$(ls tests/fuzz/regressions/$$t | wc -l) kept regression input(s): clean"; \
	  fi; \
	  mkdir $$work/corpus; cp tests/fuzz/seeds/$$t/* $$work/corpus/; \
	  ./tests/fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
	    -artifact_prefix=tests/fuzz/crash-$$t- $$work/corpus > $$work/fuzz.log 2>&1; rc=$$?; \
	  grep -E "^stat::number_of_executed_units|^stat::peak_rss_mb" $$work/fuzz.log | sed "s/^/fuzz $$t: /"; \
	  echo "fuzz $$t: corpus grew from $$(ls tests/fuzz/seeds/$$t | wc -l) to $$(ls $$work/corpus | wc -l) inputs"; \
	  if [ $$rc -ne 0 ]; then tail -60 $$work/fuzz.log; rm -rf $$work; exit 1; fi; \
	  rm -rf $$work; \
	done

# the loader's throughput, for the two data sets of issue 3 (JPEG_DIR: an ImageNet-style folder)
JPEG_DIR ?= /tmp/excb_jpeg_folder
bench-data: excb data
	./excb bench-data --data fashion-mnist --config resnet20s --seconds 15 --reps 5 --workers 1
	./excb bench-data --data fashion-mnist --config resnet20s --seconds 15 --reps 5 --workers 2
	test -d $(JPEG_DIR) || /usr/bin/python3 bench/make_jpeg_folder.py $(JPEG_DIR)
	./excb bench-data --data $(JPEG_DIR) --config resnet50 --batch 64 --seconds 40 --reps 5 --workers 1
	./excb bench-data --data $(JPEG_DIR) --config resnet50 --batch 64 --seconds 40 --reps 5 --workers 2

clean:
	rm -f excb excb_kernels.o excb_test.o excb_f64.o excb_asan.o excb_tsan.o $(TESTS) tests/*.asan tests/tsan_loader tests/tsan_loader.log $(FUZZ_BINS)

# issue 4's figures: the README's main command timed, and 10 kill -9s during a run, each resumed
# issue 5's figures, on a machine with a GPU: tests/test_gpu, then excb and the PyTorch peer alternating
.PHONY: bench-gpu
bench-gpu: excb tests/test_gpu
	bench/gpu_checks.sh $(PEER)
.PHONY: bench-train bench-kill
bench-train: excb
	bash -c 'time ./excb train --out runs/bench-default --force'
bench-kill: excb
	bench/kill_resume.sh 10 150 /tmp/excb_kill
