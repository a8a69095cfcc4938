# excb: build the CPU reference, its tests and the benchmarks.
#   make run        the main job on a fresh machine: install the missing Debian packages, build, copy the
#                   embedded data set, train the default preset and print its evaluation (ARGS=... are
#                   passed to ./excb train, e.g. make run ARGS=--force to start the run over)
#   make test       the tests on a fresh machine: install the missing packages, build, run every suite,
#                   the sanitizers and a short fuzz (what CI runs)
#   make            build ./excb alone, with what is installed (make deps installs the rest)
#   make check      every test, without the install step; make suites: the Criterion suites alone
#   make data       copy the embedded default data set (Fashion-MNIST, Debian) into data/
#   make bench      ./excb bench for the two configurations of issue 2
#   make bench-data the loader's throughput (issue 3)
# Optional features are probed and announced; without them the build degrades, never silently:
#   oneDNN (libdnnl-dev)  the fast GEMM; without it the naive GEMM is used (correct, ~50x slower)
#   CUDA, cuBLAS, cuDNN   the GPU path (excb_kernels.cu)
#   gnuplot (gnuplot-nox) excb plot; Criterion (libcriterion-dev) the test suites
# `make` alone builds ./excb (the data rule below would otherwise be the first target)
.DEFAULT_GOAL := all

# --- the Debian packages, written once -------------------------------------------------------------
# `make deps` (and `make run`, `make test`, CI's .ci/run through `make test`) installs the missing ones
# with tools/install-debian-packages: apt-get as root, or through sudo; with neither it prints the
# exact apt-get line and exits 69. The probes below name the same variables in their messages.
# gcc with OpenMP and make; pkg-config finds Criterion
PKG_BUILD     := build-essential pkg-config
# the gzip, PNG and JPEG readers (required)
PKG_IMAGES    := zlib1g-dev libpng-dev libjpeg62-turbo-dev
# JSON: the safetensors header of excb export/import (required)
PKG_JSON      := libjansson-dev
# oneDNN: the fast GEMM (optional; without it ./excb is correct and about 50x slower)
PKG_DNNL      := libdnnl-dev
# the embedded default data set, Fashion-MNIST
PKG_DATA      := dataset-fashion-mnist
# excb plot (optional; the end-to-end tests check the plots)
PKG_GNUPLOT   := gnuplot-nox
# the test suites
PKG_CRITERION := libcriterion-dev
# libFuzzer and LeakSanitizer, for make fuzz and make test-asan
PKG_FUZZ      := clang libclang-rt-14-dev
# Open MPI: mpirun -np R ./excb train, data parallel (optional; without it ./excb is one process)
PKG_MPI       := libopenmpi-dev openmpi-bin
PACKAGES_RUN  := $(PKG_BUILD) $(PKG_IMAGES) $(PKG_JSON) $(PKG_DNNL) $(PKG_DATA) $(PKG_GNUPLOT)
PACKAGES_TEST := $(PACKAGES_RUN) $(PKG_CRITERION) $(PKG_FUZZ) $(PKG_MPI)
INSTALL_LINE   = apt-get install --no-install-recommends

CC      ?= gcc
# -ffp-contract=off: every a*b+c in the source rounds twice, as written (no silent FMA contraction);
# and no fast-math flags: IEEE semantics (subnormals, NaN checks, the fp16 rounding of A4) are part of the method.
CFLAGS  ?= -O3 -march=native
# -Wno-format-truncation: paths are cut at 4 KiB by snprintf on purpose (and such a path then fails to open)
CFLAGS  += -std=c11 -Wall -Wextra -Wno-unknown-pragmas -Wno-format-truncation -ffp-contract=off -fopenmp
LDLIBS  += -lm -fopenmp -lpthread -lz -lpng -ljpeg -ljansson

# The GPU path (excb_kernels.cu): built whenever nvcc, cuBLAS and cuDNN are found (CUDA_HOME), also on
# machines without a GPU; the binary then runs on the CPU and says so. EXCB_CPU_ONLY=1 skips it.
# -fmad=false: no silent FMA contraction in the kernels either (cuBLAS and cuDNN keep their own).
# Code for sm_80 (A100) and sm_90 (H100/H200), plus PTX of compute_90 for newer GPUs. cudart is linked
# statically; cuBLAS and cuDNN are found at run time through the rpath or LD_LIBRARY_PATH.
CUDA_HOME ?= /usr/local/cuda
NVCC      ?= $(CUDA_HOME)/bin/nvcc
NVCCFLAGS ?= -O3 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=[sm_90,compute_90]
NVCCFLAGS += -std=c++17 -fmad=false -Xcompiler -Wall,-Wno-unknown-pragmas
CUDA_LIBS := -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcudnn -lcublas -lcudart_static -ldl -lrt -lpthread -lstdc++

# --- probes: each compiles, links and runs a tiny program (tools/probes/NAME.c) ---------------------
# $(call probe,NAME,FLAGS): the line the program printed when tools/probes/NAME.c compiled with FLAGS,
# linked and ran with exit 0; empty otherwise. (Piping a backslash-escaped include line to the preprocessor is no test:
# GNU make 4.3 keeps the backslash, the preprocessor sees no directive and "succeeds" whatever is there.)
comma := ,
probe = $(shell d=$$(mktemp -d) && $(CC) -w -o $$d/p tools/probes/$(1).c $(2) >/dev/null 2>&1 && $$d/p 2>/dev/null | head -1; rm -rf $$d)

# `make run`, `make test` and `make deps` install first and probe afterwards, in a second make, so
# that what was just installed is found; the first make probes nothing.
WRAPPERS := run test deps deps-run deps-test
ifneq ($(filter-out $(WRAPPERS),$(or $(MAKECMDGOALS),all)),)

# required: a C compiler with OpenMP, zlib, libpng, libjpeg, jansson
MISSING := $(if $(call probe,openmp,-fopenmp),,$(PKG_BUILD)) $(if $(call probe,zlib,-lz),,zlib1g-dev) \
           $(if $(call probe,png,-lpng),,libpng-dev) $(if $(call probe,jpeg,-ljpeg),,libjpeg62-turbo-dev) \
           $(if $(call probe,jansson,-ljansson),,libjansson-dev)
MISSING := $(strip $(MISSING))
ifneq ($(MISSING),)
  $(info ✗ missing, and needed to build ./excb: $(MISSING). Install: make deps (or $(INSTALL_LINE) $(MISSING)))
endif

# optional: oneDNN, the GPU path, Criterion (tests only), gnuplot (excb plot)
ifneq ($(EXCB_NO_DNNL),1)
DNNL := $(call probe,dnnl,-ldnnl)
endif
ifneq ($(DNNL),)
  CFLAGS += -DEXCB_USE_DNNL
  LDLIBS += -ldnnl
  $(info ✓ $(DNNL) found: dnnl_sgemm is the GEMM)
else ifeq ($(EXCB_NO_DNNL),1)
  $(info ✗ oneDNN not used (EXCB_NO_DNNL=1): naive GEMM (slow))
else
  $(info ✗ oneDNN not found: naive GEMM (correct, about 50x slower). Install: $(INSTALL_LINE) $(PKG_DNNL))
endif

# Open MPI (excb.c section 10b): `mpirun -np R ./excb train` trains data parallel over R processes
ifneq ($(EXCB_NO_MPI),1)
MPI_FLAGS := $(shell mpicc --showme:compile 2>/dev/null) $(shell mpicc --showme:link 2>/dev/null)
MPI := $(if $(strip $(MPI_FLAGS)),$(call probe,mpi,$(MPI_FLAGS)))
endif
ifneq ($(MPI),)
  CFLAGS += -DEXCB_MPI $(shell mpicc --showme:compile)
  LDLIBS += $(shell mpicc --showme:link)
  $(info ✓ $(MPI) found: mpirun -np R ./excb train runs R data-parallel ranks)
else
  $(info ✗ Open MPI not found: ./excb trains in one process (--chunks R still computes R ranks' shares). Install: $(INSTALL_LINE) $(PKG_MPI))
endif

ifneq ($(EXCB_CPU_ONLY),1)
CUDA := $(shell test -x $(NVCC) && echo 1)
CUDA := $(if $(CUDA),$(call probe,cuda,-I$(CUDA_HOME)/include $(CUDA_LIBS)))
endif
ifneq ($(CUDA),)
  CUDA_OBJ := excb_kernels.o
  CFLAGS += -DEXCB_CUDA
  LDLIBS += $(CUDA_LIBS)
  $(info ✓ $(CUDA) found in $(CUDA_HOME): the GPU path is built)
  # NCCL (in the CUDA toolkit): the gradient all-reduce on the GPUs when every rank has one of its own;
  # without it (or with ranks sharing a GPU) device buffers go through host memory over MPI
  ifneq ($(EXCB_NO_NCCL),1)
    NCCL := $(call probe,nccl,-I$(CUDA_HOME)/include -L$(CUDA_HOME)/lib64 -Wl$(comma)-rpath$(comma)$(CUDA_HOME)/lib64 -lnccl)
  endif
  ifneq ($(NCCL),)
    NVCCFLAGS += -DEXCB_NCCL
    LDLIBS += -lnccl
    $(info ✓ $(NCCL) found: mpirun ranks with a GPU each all-reduce their gradients with NCCL)
  else
    $(info ✗ NCCL not found: GPU ranks reduce through host memory over MPI)
  endif
else ifeq ($(EXCB_CPU_ONLY),1)
  $(info ✗ CUDA path not built (EXCB_CPU_ONLY=1): CPU only)
else
  $(info ✗ CUDA path not built: no nvcc, cuBLAS and cuDNN that link in CUDA_HOME=$(CUDA_HOME) (CPU only). Install NVIDIA's CUDA toolkit and cuDNN: apt-get install cuda-toolkit cudnn9-cuda-13, from NVIDIA's repository)
endif

CRITERION := $(call probe,criterion,$(shell pkg-config --cflags --libs criterion 2>/dev/null || echo -lcriterion))
ifeq ($(CRITERION),)
  $(info ✗ Criterion not found: the test suites cannot be built. Install: $(INSTALL_LINE) $(PKG_CRITERION) pkg-config)
endif
ifeq ($(shell echo 'set terminal png; set output "/dev/null"; plot x' | gnuplot >/dev/null 2>&1 && echo 1),)
  $(info ✗ gnuplot with PNG output not found: excb plot exits 69. Install: $(INSTALL_LINE) $(PKG_GNUPLOT))
endif
endif

# --- the two commands of the README, and the install step they share -------------------------------
.PHONY: run deps deps-run deps-test
deps: deps-test
deps-run:
	@sh tools/install-debian-packages $(PACKAGES_RUN)
deps-test:
	@sh tools/install-debian-packages $(PACKAGES_TEST)
ARGS ?=
run: deps-run
	@$(MAKE) --no-print-directory all data
	./excb train $(ARGS)
# build in parallel, then run the suites one after another (their timings and outputs stay apart)
test: deps-test
	@$(MAKE) --no-print-directory -j$$(nproc) all data $(TESTS)
	@$(MAKE) --no-print-directory check

excb_kernels.o: excb_kernels.cu excb.h
	$(NVCC) $(NVCCFLAGS) -DEXCB_CUDA -c -o $@ excb_kernels.cu

TESTS := tests/test_gpu tests/test_equations tests/test_gradients tests/test_whole_model_f64 tests/test_step tests/test_methods \
         tests/test_data tests/test_views tests/test_train tests/test_weights tests/test_train_e2e

.PHONY: audit-small-batch audit-ablations audit-quick
.PHONY: all check suites test-fast test-step bench bench-methods bench-compare fixture method-fixtures parity-peer clean data golden \
        fuzz fuzz-build test-asan test-tsan bench-data

# The embedded default data set: Fashion-MNIST from the Debian package dataset-fashion-mnist, copied
# (still gzipped, 30 MB) into data/fashion-mnist, where `--data fashion-mnist` finds it.
FMNIST_SRC ?= /usr/share/datasets/fashion-mnist
FMNIST_FILES := train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz
data: $(addprefix data/fashion-mnist/,$(FMNIST_FILES))
data/fashion-mnist/%.gz:
	@test -f $(FMNIST_SRC)/$*.gz || { echo "missing $(FMNIST_SRC)/$*.gz: make deps (or $(INSTALL_LINE) $(PKG_DATA))" >&2; exit 66; }
	mkdir -p data/fashion-mnist
	cp $(FMNIST_SRC)/$*.gz $@.tmp && mv $@.tmp $@
all: excb

excb: excb.c excb.h $(CUDA_OBJ)
ifneq ($(MISSING),)
	@echo "✗ cannot build ./excb without $(MISSING): make deps installs them (or $(INSTALL_LINE) $(MISSING))" >&2; exit 69
endif
	$(CC) $(CFLAGS) -o $@ excb.c $(CUDA_OBJ) $(LDLIBS)

# the first line of every recipe that builds a Criterion suite
need_criterion = $(if $(CRITERION),,@echo "✗ cannot build $@ without Criterion: make deps installs it (or $(INSTALL_LINE) $(PKG_CRITERION) pkg-config)" >&2; exit 69)

# the whole implementation compiled without main, for the tests
excb_test.o: excb.c excb.h
	$(CC) $(CFLAGS) -DTESTING -c -o $@ excb.c

# the same source in float64 (real = double, naive GEMM), for whole-network finite differences
excb_f64.o: excb.c excb.h
	$(CC) $(CFLAGS) -UEXCB_CUDA -DTESTING -DEXCB_REAL_DOUBLE -c -o $@ excb.c

tests/test_whole_model_f64: tests/test_whole_model_f64.c tests/testutil.h excb_f64.o
	$(need_criterion)
	$(CC) $(CFLAGS) -UEXCB_CUDA -DEXCB_REAL_DOUBLE $(shell pkg-config --cflags criterion) -I. -o $@ $< excb_f64.o $(shell pkg-config --libs criterion) $(LDLIBS)

tests/%: tests/%.c tests/testutil.h excb_test.o $(CUDA_OBJ)
	$(need_criterion)
	$(CC) $(CFLAGS) $(shell pkg-config --cflags criterion) -I. -o $@ $< excb_test.o $(CUDA_OBJ) $(shell pkg-config --libs criterion) $(LDLIBS)

# every test (what `make test` runs after its install step, and so what CI runs): the Criterion suites,
# the data/view suites under ASan+UBSan, the loader's threads under ThreadSanitizer, a short fuzz of
# every reader
check: suites test-asan test-tsan fuzz

suites: test-fast test-step
# Criterion runs one test process per core at once, and each opens an OpenMP team of one thread per core:
# threads that spin at a barrier then take the cores from the other processes' threads (the f64 suite:
# 1.5 s with one thread, 16-71 s per test with two on 2 cores; CI timed out at 300 s). Passive waiting
# sleeps instead; the numbers the tests compute do not depend on it. Not for test-step: its e2e tests
# time signals and second processes against live runs of the binary, and were written at its speed.
test-fast test-asan test-tsan: export OMP_WAIT_POLICY = PASSIVE
test-fast: tests/test_equations tests/test_gradients tests/test_whole_model_f64 tests/test_data tests/test_views \
           tests/test_train tests/test_weights tests/test_gpu excb
	./tests/test_equations
	./tests/test_gradients
	./tests/test_whole_model_f64
	./tests/test_data
	./tests/test_views
	./tests/test_train
	./tests/test_weights
	@# the GPU suite: each test says SKIP and why when this build or machine has no GPU (--verbose shows it)
	@bash -c 'set -o pipefail; ./tests/test_gpu --verbose 2>&1 | grep -E "SKIP|FAIL|CRASH|Synthesis|gpu-vs"'
# the slower suites: whole training steps, and whole runs of the binary (resume, kill -9, divergence)
test-step: tests/test_step tests/test_methods tests/test_train_e2e excb
	./tests/test_step
	./tests/test_methods
	@# the GPU ranks' tests say SKIP and why on a machine without a GPU (or without two, for NCCL's)
	@bash -c 'set -o pipefail; ./tests/test_train_e2e --verbose 2>&1 | grep -vE "^\[(RUN |PASS)\]|Test is disabled"'

bench: excb
	./excb bench --config resnet20s --global-size 28 --local-size 12 --batch 256 --K 4096
	./excb bench --config resnet18 --global-size 32 --local-size 16 --batch 64 --K 4096

# the cost of each balancing rule: the whole step per method (interleaved rounds), and the rule alone
bench/rule_cost: bench/rule_cost.c excb_test.o $(CUDA_OBJ)
	$(CC) $(CFLAGS) -I. -o $@ $< excb_test.o $(CUDA_OBJ) $(LDLIBS)
bench-methods: excb bench/rule_cost
	sh bench/methods.sh 3
	./bench/rule_cost

# the machine's FMA peak, printed beside every timing (bench/compare.py, bench/recipes.sh)
bench/fma_peak: bench/fma_peak.c
	$(CC) -O2 -march=native -fopenmp -o $@ $<

# the same-run comparison with the PyTorch peer, at 1 and 2 threads, against Debian's PyTorch (needs
# python3-torch and libopenblas0-pthread: without it that PyTorch has no real BLAS) and, when
# TORCH_VENV holds one, pip's (python3 -m venv $(TORCH_VENV) && $(TORCH_VENV)/bin/pip install torch numpy)
TORCH_VENV ?= /opt/torchvenv
bench-compare: excb bench/fma_peak
	/usr/bin/python3 bench/compare.py --peer $(PEER) --torch "Debian torch + OpenBLAS=/usr/bin/python3" \
	  $(if $(wildcard $(TORCH_VENV)/bin/python),--torch "pip torch=$(TORCH_VENV)/bin/python")

# regenerate the float64 parity fixtures (needs python3-torch; CI never does this)
fixture:
	/usr/bin/python3 tests/reference/make_fixture.py
	/usr/bin/python3 tests/reference/make_fixture.py --yardstick
# the per-method fixtures of tests/test_methods.c (and their float32 yardstick, methods/YARDSTICK.txt)
method-fixtures:
	/usr/bin/python3 tests/reference/make_method_fixtures.py
	/usr/bin/python3 tests/reference/make_more_method_fixtures.py

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
	$(need_criterion)
	$(CC) -std=c11 -Wall -Wextra -Wno-unknown-pragmas -Wno-format-truncation -ffp-contract=off -fopenmp $(ASAN) -DTESTING -c -o excb_asan.o excb.c
	for t in test_data test_views test_equations test_weights; do \
	  $(CC) -std=c11 -ffp-contract=off -fopenmp $(ASAN) $(shell pkg-config --cflags criterion) -I. -o tests/$$t.asan tests/$$t.c excb_asan.o \
	    $(shell pkg-config --libs criterion) -lm -fopenmp -lpthread -lz -lpng -ljpeg -ljansson || exit 1; \
	  ASAN_OPTIONS=detect_leaks=1 LSAN_OPTIONS=suppressions=tests/lsan.supp ./tests/$$t.asan --jobs 1 || exit 1; \
	done

# The loader's threads under ThreadSanitizer. Criterion's runner does not run under TSan, so a plain
# driver (tests/tsan_loader.c) exercises 1-4 workers, resume, a bad file and the skip path.
test-tsan:
	$(CC) -std=c11 -Wno-unknown-pragmas -Wno-format-truncation -ffp-contract=off -fsanitize=thread -g -O1 -DTESTING -c -o excb_tsan.o excb.c
	$(CC) -std=c11 -ffp-contract=off -fsanitize=thread -g -O1 -I. -o tests/tsan_loader tests/tsan_loader.c excb_tsan.o -lm -lpthread -lz -lpng -ljpeg -ljansson
	./tests/tsan_loader > tests/tsan_loader.log 2>&1 || { cat tests/tsan_loader.log; exit 1; }
	tail -1 tests/tsan_loader.log

# libFuzzer targets, one per reader/decoder (tests/fuzz/fuzz_readers.c). `make fuzz` first replays the
# kept regression inputs, then fuzzes each target for FUZZ_SECONDS from the seed corpus (the corpus
# grows in a scratch copy, never in the repository). Crashes land in tests/fuzz/crash-*.
# The closing figures of issue 13 (10^7 executions per target, one core, about 75 minutes in all):
#   make fuzz FUZZ_TARGETS="cifar stl ckpt" FUZZ_LIMIT=-runs=10000000
# and of issue 19: make fuzz FUZZ_TARGETS=safetensors FUZZ_LIMIT=-runs=10000000
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 20
FUZZ_LIMIT   ?= -max_total_time=$(FUZZ_SECONDS)
FUZZ_TARGETS := idx image cifar stl ckpt safetensors
FUZZ_FLAGS   := -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -DTESTING
FUZZ_BINS    := $(addprefix tests/fuzz/fuzz_,$(FUZZ_TARGETS))
fuzz-build: $(FUZZ_BINS)
$(FUZZ_BINS): tests/fuzz/fuzz_%: tests/fuzz/fuzz_readers.c excb.c excb.h
	$(FUZZ_CC) $(FUZZ_FLAGS) -DFUZZ_$$(echo $* | tr a-z A-Z) -I. -o $@ tests/fuzz/fuzz_readers.c excb.c -lz -lpng -ljpeg -ljansson -lm -lpthread
fuzz: fuzz-build
	@for t in $(FUZZ_TARGETS); do \
	  work=$$(mktemp -d); \
	  if ls tests/fuzz/regressions/$$t/* >/dev/null 2>&1; then \
	    ./tests/fuzz/fuzz_$$t -malloc_limit_mb=8 tests/fuzz/regressions/$$t/* > $$work/replay.log 2>&1 || { cat $$work/replay.log; exit 1; }; \
	    echo "fuzz $$t: replayed $$(ls tests/fuzz/regressions/$$t | wc -l) kept regression input(s): clean"; \
	  fi; \
	  mkdir $$work/corpus; cp tests/fuzz/seeds/$$t/* $$work/corpus/; \
	  ./tests/fuzz/fuzz_$$t $(FUZZ_LIMIT) -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
	    -artifact_prefix=tests/fuzz/crash-$$t- $$work/corpus > $$work/fuzz.log 2>&1; rc=$$?; \
	  grep -E "^stat::number_of_executed_units|^stat::average_exec_per_sec|^stat::peak_rss_mb" $$work/fuzz.log | sed "s/^/fuzz $$t: /"; \
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
# the audit (README, "Is ExCB stable at small batch sizes?"; paper_notes.md §10b): one run directory per
# run under runs/, resumable; AUDIT_FLAGS="--jobs 2 --threads 1" runs two at once
audit-small-batch: excb data
	./excb audit small-batch $(AUDIT_FLAGS)
audit-ablations: excb data
	./excb audit ablations $(AUDIT_FLAGS)
audit-quick: excb data
	./excb audit small-batch --quick $(AUDIT_FLAGS)
bench-kill: excb
	bench/kill_resume.sh 10 150 /tmp/excb_kill
