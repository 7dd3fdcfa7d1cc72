# optd: one non-recursive Makefile. `make` builds build/optd, `make test` runs
# every test, `make asan` runs them again under ASan+UBSan, `make run` starts
# the daemon on its defaults. Missing Debian packages are installed by
# deploy/install-deps.sh (as root) or named in a clear message.

ifeq ($(origin CC),default)
CC      := gcc
endif
CFLAGS  ?= -O2 -g
PKGS    := libmicrohttpd libcjson sqlite3
# -fno-math-errno lets gcc vectorize sqrt without changing any result;
# never -ffast-math: results must match torch's order of operations.
WARN    := -std=c11 -Wall -Wextra -Wshadow -Wpointer-arith -Wstrict-prototypes -Werror
BASE    := -D_GNU_SOURCE -fno-math-errno -MMD -MP -I. $(WARN)
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

DEPS_OK := $(shell pkg-config --exists $(PKGS) cmocka 2>/dev/null && echo yes)
# Deferred (=) so a build that just installed the packages sees them.
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   = $(shell pkg-config --libs $(PKGS) 2>/dev/null)

COMMON_SRC := common/err.c
OPTIM_SRC  := optim/optim.c optim/kernels.c
STORE_SRC  := store/store.c
API_SRC    := api/route.c api/training.c api/codec.c api/session.c api/writer.c api/metrics.c api/http.c
DAEMON_SRC := daemon/main.c daemon/config.c

LIB_SRC := $(COMMON_SRC) $(OPTIM_SRC) $(STORE_SRC) $(API_SRC)
# Files served by the daemon, compiled into it (no asset on disk at run time).
ASSETS  := asset_dashboard=api/assets/dashboard.html asset_openapi=api/openapi.json
LIB_OBJ := $(LIB_SRC:%.c=$(B)/%.o) $(B)/gen/assets.o

# Unit tests: tests/test_<module>.c, each linked with the library objects.
UNIT_TESTS := test_optim test_store test_config test_codec
UNIT_BINS  := $(UNIT_TESTS:%=$(B)/tests/%)

.PHONY: all run test unit e2e asan bench fuzz fmt clean deps
all: deps $(B)/optd

deps:
	@if [ "$(DEPS_OK)" != yes ]; then sh deploy/install-deps.sh; fi

$(B)/gen/assets.c: api/embed.py $(foreach a,$(ASSETS),$(word 2,$(subst =, ,$(a))))
	@mkdir -p $(dir $@)
	python3 api/embed.py $@ $(ASSETS)

$(B)/gen/assets.o: $(B)/gen/assets.c
	$(CC) $(CFLAGS) -c $< -o $@

$(B)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(BASE) $(PKG_CFLAGS) $(CFLAGS) -c $< -o $@

$(B)/optd: $(LIB_OBJ) $(DAEMON_SRC:%.c=$(B)/%.o)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(PKG_LIBS) $(LDLIBS)

$(B)/tests/%: $(B)/tests/%.o $(LIB_OBJ)
	$(CC) $(LDFLAGS) -o $@ $^ $(PKG_LIBS) -lcmocka $(LDLIBS)
$(B)/tests/test_config: $(B)/daemon/config.o

run: all
	./$(B)/optd

unit: deps $(UNIT_BINS)
	@set -e; for t in $(UNIT_BINS); do echo "== $$t"; (cd tests && ../$$t); done

e2e: all
	OPTD_BIN=$(B)/optd python3 tests/e2e/run.py

test: unit e2e

asan:
	$(MAKE) SAN=1 test

# bench: optimizer kernels against memory bandwidth and torch, then the service
# against its HTTP and SQLite ceilings; prints a table, writes bench/RESULTS.md.
BENCH_BINS := $(B)/bench/kernels $(B)/bench/loadgen $(B)/bench/mhd_ceiling $(B)/bench/sqlite_ceiling
$(B)/bench/kernels.o: CFLAGS += -O3
$(B)/bench/kernels: $(B)/bench/kernels.o $(B)/optim/optim.o $(B)/optim/kernels.o
	$(CC) $(LDFLAGS) -o $(B)/bench/kernels $^ $(LDLIBS)
$(B)/bench/loadgen $(B)/bench/mhd_ceiling $(B)/bench/sqlite_ceiling: $(B)/bench/%: $(B)/bench/%.o
	$(CC) $(LDFLAGS) -o $(B)/bench/$* $^ $(PKG_LIBS) $(LDLIBS)
bench: all $(BENCH_BINS)
	sh bench/install-deps.sh && /usr/bin/python3 bench/run.py --build $(B)

clean:
	rm -rf build

fmt:
	clang-format -i $(LIB_SRC) $(DAEMON_SRC) $(wildcard */*.h) $(wildcard tests/*.c)

-include $(shell find build -name '*.d' 2>/dev/null)

# training-test: worker rounds, lr schedules and clipping against torch
# reference data (tests/training/gen_reference.py), forks, validation, and the
# rounds/s figure (writes tests/training/ROUNDS.md).
training-test: all
	python3 tests/training/run.py
