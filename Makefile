# optd: one non-recursive Makefile. `make` builds build/optd, `make test` runs
# every test, `make asan` runs them again under ASan+UBSan, `make run` starts
# the daemon (on its defaults, or with ARGS="--flag value ..."). Missing Debian packages are installed by
# deploy/install-deps.sh (as root) or named in a clear message.

ifeq ($(origin CC),default)
CC      := gcc
endif
ifeq ($(origin CXX),default)
CXX     := g++
endif
CFLAGS  ?= -O2 -g
PKGS    := libmicrohttpd libcjson sqlite3 libcurl
# -fno-math-errno lets gcc vectorize sqrt without changing any result;
# never -ffast-math: results must match torch's order of operations.
# -ffp-contract=off: no a*b+c fused into an FMA (one rounding instead of
# two). -std=c11 implies it, -std=gnu11 does not: say it, so exactness never
# hangs on the dialect.
FPFLAGS := -fno-math-errno -ffp-contract=off
WARN    := -std=c11 -Wall -Wextra -Wshadow -Wpointer-arith -Wstrict-prototypes -Werror
BASE    := -D_GNU_SOURCE $(FPFLAGS) -MMD -MP -I. $(WARN)
LDLIBS  := -lm -lpthread

B ?= build
# Sanitizer builds go to their own tree so the two never mix objects.
ifeq ($(SAN),1)
B := build/asan
CFLAGS := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all
LDFLAGS += -fsanitize=address,undefined
endif

# The kernels are where the time goes: -O3 for the vectorizer and unswitching.
$(B)/optim/kernels.o: CFLAGS += -O3
# The wire conversions are on the step path too (http/wire.c).
$(B)/http/wire.o: CFLAGS += -O3

# Dragonbox (libdragonbox-dev) is header-only and ships no .pc file: its
# versioned include folder is looked for (deferred, like the flags below).
DRAGONBOX_INC = $(firstword $(wildcard /usr/include/dragonbox-*/dragonbox/dragonbox.h))
DEPS_OK := $(shell pkg-config --exists $(PKGS) cmocka 2>/dev/null && ls /usr/include/dragonbox-*/dragonbox/dragonbox.h \
                   >/dev/null 2>&1 && echo yes)
# Deferred (=) so a build that just installed the packages sees them.
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   = $(shell pkg-config --libs $(PKGS) 2>/dev/null)
# engine/ is the core: no JSON, no HTTP. It is compiled with sqlite3's flags
# only (cJSON.h is not on its path), and with microhttpd.h's include guard
# predefined (it sits in /usr/include), so a use of either fails the build.
ENGINE_PKG_CFLAGS = $(shell pkg-config --cflags sqlite3 2>/dev/null) -DMHD_MICROHTTPD_H -DcJSON__h

COMMON_SRC := common/err.c common/util.c common/names.c common/bigbuf.c
# C++ only where a Debian library is C++: the shortest-digits shim over
# Dragonbox (no exceptions, no RTTI, no libstdc++ at link time).
COMMON_CXX := common/shortest.cpp
OPTIM_SRC  := optim/optim.c optim/kernels.c
STORE_SRC  := store/store.c
ENGINE_SRC := engine/training.c engine/settings.c engine/session.c engine/stats.c engine/writer.c engine/shape.c \
              engine/idem.c
HTTP_SRC   := http/route.c http/strict.c http/codec.c http/settings.c http/jbody.c http/checkpoint.c \
              http/safetensors.c http/metrics.c http/http.c http/ops.c http/wire.c http/groups.c
DAEMON_SRC := daemon/main.c daemon/config.c

LIB_SRC := $(COMMON_SRC) $(OPTIM_SRC) $(STORE_SRC) $(ENGINE_SRC) $(HTTP_SRC)
# Files served by the daemon, compiled into it (no asset on disk at run time).
ASSETS  := asset_dashboard=http/assets/dashboard.html asset_openapi=http/openapi.json
LIB_OBJ := $(LIB_SRC:%.c=$(B)/%.o) $(COMMON_CXX:%.cpp=$(B)/%.o) $(B)/gen/assets.o

# Unit tests: tests/test_<module>.c, each linked with the library objects.
UNIT_TESTS := test_optim test_store test_config test_codec test_engine test_wire test_shape test_bigbuf
UNIT_BINS  := $(UNIT_TESTS:%=$(B)/tests/%)

.PHONY: all run test unit e2e asan bench fuzz fmt clean deps
all: deps $(B)/optd

deps:
	@if [ "$(DEPS_OK)" != yes ]; then sh deploy/install-deps.sh; fi

$(B)/gen/assets.c: http/embed.py $(foreach a,$(ASSETS),$(word 2,$(subst =, ,$(a))))
	@mkdir -p $(dir $@)
	python3 http/embed.py $@ $(ASSETS)

$(B)/gen/assets.o: $(B)/gen/assets.c
	$(CC) $(FPFLAGS) $(CFLAGS) -c $< -o $@

$(B)/%.o: %.c | deps
	@mkdir -p $(dir $@)
	$(CC) $(BASE) $(PKG_CFLAGS) $(CFLAGS) -c $< -o $@

CXXBASE = -std=c++17 -fno-exceptions -fno-rtti $(FPFLAGS) -MMD -MP -I. -I$(patsubst %/dragonbox/dragonbox.h,%,$(DRAGONBOX_INC)) \
          -Wall -Wextra -Wshadow -Werror
$(B)/%.o: %.cpp | deps
	@mkdir -p $(dir $@)
	$(CXX) $(CXXBASE) $(CFLAGS) -c $< -o $@

$(B)/engine/%.o: engine/%.c | deps
	@mkdir -p $(dir $@)
	$(CC) $(BASE) $(ENGINE_PKG_CFLAGS) $(CFLAGS) -c $< -o $@

$(B)/optd: $(LIB_OBJ) $(DAEMON_SRC:%.c=$(B)/%.o)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(PKG_LIBS) $(LDLIBS)

$(B)/tests/%: $(B)/tests/%.o $(LIB_OBJ)
	$(CC) $(LDFLAGS) -o $@ $^ $(PKG_LIBS) -lcmocka $(LDLIBS)
$(B)/tests/test_config: $(B)/daemon/config.o
# test_engine fails allocations one at a time (see the test): our objects'
# malloc, calloc, realloc and strdup go through its wrappers.
$(B)/tests/test_engine: LDFLAGS += -Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc,--wrap=strdup

# make run ARGS="--listen 127.0.0.1:9000 --db /tmp/x.db": flags for the daemon
# (the OPTD_* environment variables work too).
ARGS ?=
run: all
	./$(B)/optd $(ARGS)

unit: deps $(UNIT_BINS)
	@set -e; for t in $(UNIT_BINS); do echo "== $$t"; (cd tests && ../$$t); done

e2e: all
	OPTD_BIN=$(B)/optd python3 tests/e2e/run.py

test: unit e2e training-test ecosystem dashboard-test faults sustained

# sustained: four loads of 20 s each against fresh daemons (tests/soak):
# the -wal file stays bounded and is given back when idle, and the writer's
# CPU per step stays flat. soak runs them for 200 s each and also watches
# RSS, descriptors and the database size.
.PHONY: sustained
sustained: all $(B)/bench/loadgen
	OPTD_BIN=$(B)/optd OPTD_BUILD=$(B) python3 tests/soak/sustained.py --seconds 20

asan:
	$(MAKE) SAN=1 test

# bench: optimizer kernels against memory bandwidth and torch, then the service
# against its HTTP and SQLite ceilings; prints a table, writes bench/RESULTS.md.
BENCH_BINS := $(B)/bench/kernels $(B)/bench/loadgen $(B)/bench/mhd_ceiling $(B)/bench/sqlite_ceiling $(B)/bench/codec
$(B)/bench/kernels.o: CFLAGS += -O3
$(B)/bench/kernels: $(B)/bench/kernels.o $(B)/optim/optim.o $(B)/optim/kernels.o
	$(CC) $(LDFLAGS) -o $(B)/bench/kernels $^ $(LDLIBS)
# codec: the JSON number printer of http/codec.c, with the daemon's objects.
$(B)/bench/codec: $(B)/bench/codec.o $(LIB_OBJ)
	$(CC) $(LDFLAGS) -o $@ $^ $(PKG_LIBS) $(LDLIBS)
$(B)/bench/loadgen $(B)/bench/mhd_ceiling $(B)/bench/sqlite_ceiling: $(B)/bench/%: $(B)/bench/%.o
	$(CC) $(LDFLAGS) -o $(B)/bench/$* $^ $(PKG_LIBS) $(LDLIBS)
bench: all $(BENCH_BINS)
	sh deploy/install-deps.sh bench && /usr/bin/python3 bench/run.py --build $(B)

clean:
	rm -rf build

# fmt: the style of .clang-format over the daemon's sources and headers
# (common/ optim/ store/ engine/ http/ daemon/) and the unit tests.
fmt:
	clang-format -i $(LIB_SRC) $(DAEMON_SRC) $(wildcard */*.h) $(wildcard tests/*.c) tests/fuzz/fuzz_decode.c

-include $(sort $(shell find build $(B) -name '*.d' 2>/dev/null))

# training-test: worker rounds, lr schedules and clipping against torch
# reference data (tests/training/gen_reference.py), forks, validation, and the
# rounds/s figure (writes tests/training/ROUNDS.md).
.PHONY: training-test
training-test: all
	OPTD_BIN=$(B)/optd python3 tests/training/run.py

# ---- Breaking it on purpose: tests/crash, tests/faults, tests/fuzz ----------
# faults: the part that `make test` runs (about 2 minutes): the fuzz corpus
# replayed, storage faults, hostile input, memory (scaled down), SIGTERM under
# load and a 5-round crash test. crash: the long crash soak (CRASH_ROUNDS
# kill -9 rounds per sync mode). soak: the full-size memory test. fuzz:
# libFuzzer on the request decoders for FUZZ_SECONDS per target (clang with
# its runtimes, installed when root); what it finds lands in tests/fuzz/regress.
.PHONY: faults crash soak fuzz
CRASH_ROUNDS ?= 50
SOAK_SECONDS ?= 200
FUZZ_SECONDS ?= 60
FUZZ_CC      ?= clang
BREAK_ENV     = OPTD_BIN=$(B)/optd EIO_SHIM=$(B)/tests/eio_shim.so UNLISTEN_SHIM=$(B)/tests/slow_unlisten_shim.so
SHIMS         = $(B)/tests/eio_shim.so $(B)/tests/slow_unlisten_shim.so

# LD_PRELOAD libraries: eio_shim fails pwrite/fsync/pread with EIO on demand;
# slow_unlisten_shim widens a shutdown race of libmicrohttpd (see the file).
$(B)/tests/eio_shim.so: tests/faults/eio_shim.c
$(B)/tests/slow_unlisten_shim.so: tests/crash/slow_unlisten_shim.c
$(SHIMS):
	@mkdir -p $(dir $@)
	$(CC) -D_GNU_SOURCE $(FPFLAGS) -std=c11 -Wall -Wextra -Werror -O2 -g -fPIC -shared -o $@ $< -ldl

# The fuzz target in a plain program that replays inputs (no libFuzzer).
$(B)/tests/fuzz_replay: $(B)/tests/fuzz/replay.o $(B)/tests/fuzz/fuzz_decode.o $(LIB_OBJ)
	$(CC) $(LDFLAGS) -o $@ $^ $(PKG_LIBS) $(LDLIBS)

# Every part runs even when one fails, so one bug does not hide the others.
faults: all $(SHIMS) $(B)/tests/fuzz_replay
	@rc=0; \
	$(B)/tests/fuzz_replay tests/fuzz/corpus/decode tests/fuzz/regress || rc=1; \
	$(BREAK_ENV) python3 tests/faults/faults_test.py || rc=1; \
	$(BREAK_ENV) python3 tests/faults/storage_test.py || rc=1; \
	$(BREAK_ENV) python3 tests/faults/hostile_test.py || rc=1; \
	$(BREAK_ENV) python3 tests/faults/memory_test.py --steps 10000 --cycles 1000 || rc=1; \
	$(BREAK_ENV) python3 tests/crash/sigterm_test.py --rounds 2 || rc=1; \
	$(BREAK_ENV) python3 tests/crash/shutdown_race_test.py --rounds 3 || rc=1; \
	$(BREAK_ENV) python3 tests/crash/crash_test.py --rounds 5 || rc=1; \
	exit $$rc

crash: all
	$(BREAK_ENV) python3 tests/crash/crash_test.py --rounds $(CRASH_ROUNDS)
	$(BREAK_ENV) python3 tests/crash/sigterm_test.py --rounds 10

soak: all $(B)/bench/loadgen
	$(BREAK_ENV) python3 tests/faults/memory_test.py --steps 100000 --cycles 10000
	OPTD_BIN=$(B)/optd OPTD_BUILD=$(B) python3 tests/soak/sustained.py --seconds $(SOAK_SECONDS) --soak

# Fuzz builds: every library object again with clang, coverage and sanitizers.
FUZZ_B     := build/fuzz
FUZZ_FLAGS := -D_GNU_SOURCE $(FPFLAGS) -I. -std=c11 -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined \
              -fno-sanitize-recover=undefined
FUZZ_OBJ   := $(LIB_SRC:%.c=$(FUZZ_B)/%.o) $(COMMON_CXX:%.cpp=$(FUZZ_B)/%.o) $(FUZZ_B)/gen/assets.o
FUZZ_CXX   ?= clang++
$(FUZZ_B)/%.o: %.cpp
	@mkdir -p $(dir $@)
	$(FUZZ_CXX) $(CXXBASE) -g -O1 -fsanitize=address,undefined -fsanitize=fuzzer-no-link -c $< -o $@
$(FUZZ_B)/%.o: %.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_FLAGS) -fsanitize=fuzzer-no-link -MMD -MP $(PKG_CFLAGS) -c $< -o $@
$(FUZZ_B)/gen/assets.o: build/gen/assets.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FPFLAGS) -c $< -o $@
$(FUZZ_B)/fuzz_decode: tests/fuzz/fuzz_decode.c $(FUZZ_OBJ)
	$(FUZZ_CC) $(FUZZ_FLAGS) -fsanitize=fuzzer $(PKG_CFLAGS) -o $@ $^ $(PKG_LIBS) $(LDLIBS)

fuzz: deps
	@sh tests/fuzz/install-clang.sh $(FUZZ_CC)
	$(MAKE) build/gen/assets.c $(FUZZ_B)/fuzz_decode
	sh tests/fuzz/run.sh $(FUZZ_B)/fuzz_decode $(FUZZ_SECONDS) $(FUZZ_B)/decode tests/fuzz/corpus/decode \
	    tests/fuzz/decode.dict

# floats-exhaustive: every float32 bit pattern through the JSON printer
# (reads back exactly, no shorter decimal does), about ten minutes on two
# cores; make test samples millions (tests/test_codec.c).
.PHONY: floats-exhaustive
$(B)/tests/float32_exhaustive: $(B)/tests/float32_exhaustive.o $(LIB_OBJ)
	$(CC) $(LDFLAGS) -o $@ $^ $(PKG_LIBS) $(LDLIBS)
floats-exhaustive: $(B)/tests/float32_exhaustive
	$(B)/tests/float32_exhaustive --threads 2

# ---- Ecosystem: tests/ecosystem ----------------------------------------------
# ecosystem: the Python client (clients/python) and its torch optimizer against
# torch.optim, http/openapi.json against the served routes, the container root
# fs (deploy/build-image-rootfs.sh) run as the image would, the Kubernetes
# manifests, three shards behind HAProxy (deploy/haproxy.cfg), the curl
# cookbook and README's commands, TypeScript types from the served OpenAPI
# document checked by tsc (openapi-typescript and typescript from the npm
# registry, installed once into build/ts; skipped without npm). Installs its
# Debian packages when root (deploy/install-deps.sh ecosystem).
.PHONY: ecosystem
ecosystem: all
	sh deploy/install-deps.sh --optional ecosystem
	OPTD_BIN=$(B)/optd /usr/bin/python3 tests/ecosystem/run.py

# dashboard-test: the dashboard page in headless Chromium (installed with
# apt-get when root; without it the browser tests are skipped) and /history.
.PHONY: dashboard-test
dashboard-test: all
	@sh deploy/install-deps.sh --optional dashboard
	OPTD_BIN=$(B)/optd python3 tests/dashboard/run.py
