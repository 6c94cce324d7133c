# apikeys — PGXS build and tests
EXTENSION = apikeys
EXTVERSION = $(shell sed -n "s/^default_version *= *'\(.*\)'/\1/p" $(EXTENSION).control)

MODULE_big = apikeys
OBJS = src/apikeys.o src/apikey_type.o src/audit.o src/credits.o src/launcher.o src/locator.o src/loghook.o src/policy.o \
       src/queue.o src/token.o src/usage.o src/verify.o src/worker.o
PGFILEDESC = "apikeys - API keys inside PostgreSQL"
SHLIB_LINK = -lsodium
PG_CFLAGS = -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers

# The install script of the version being built comes from sql/apikeys.sql;
# released versions' scripts and the upgrade scripts between versions
# (sql/apikeys--X--Y.sql) are installed as committed.
DATA_built = sql/$(EXTENSION)--$(EXTVERSION).sql
DATA = $(filter-out $(DATA_built), $(wildcard sql/$(EXTENSION)--*.sql))
EXTRA_CLEAN = test/unit/token_test tmp_regress tmp_nopreload output_iso

# make installcheck: every suite (pg_regress, isolation, TAP) against the
# running server (PGHOST, PGPORT), which must load apikeys through
# shared_preload_libraries, as test/apikeys.conf does.
# make installcheck TEMP_INSTANCE=1: the regression and isolation suites on a
# temporary server started with test/apikeys.conf (no server need run).
# The TAP tests always start their own servers.
REGRESS = token type keys verify limits lifecycle guards roles audit usage ratelimit credits manage secrets search_path
REGRESS_OPTS = --inputdir=. --load-extension=$(EXTENSION)
ISOLATION = $(patsubst test/isolation/specs/%.spec,%,$(sort $(wildcard test/isolation/specs/*.spec)))
ISOLATION_OPTS = --inputdir=test/isolation --outputdir=output_iso --load-extension=$(EXTENSION)
TAP_TESTS = 1
PROVE_TESTS = test/tap/*.pl

ifdef TEMP_INSTANCE
REGRESS_OPTS += --temp-instance=tmp_regress --temp-config=test/apikeys.conf
ISOLATION_OPTS += --temp-instance=tmp_regress --temp-config=test/apikeys.conf
endif

# No JIT bitcode: the build needs no clang.
override with_llvm = no

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

sql/$(EXTENSION)--$(EXTVERSION).sql: sql/$(EXTENSION).sql
	cp $< $@

# The suite for a server without the preload (TEMP_INSTANCE=1: a temporary one).
NOPRELOAD_OPTS = --inputdir=test/nopreload --outputdir=tmp_nopreload --load-extension=$(EXTENSION) \
	--dbname=apikeys_nopreload $(if $(TEMP_INSTANCE),--temp-instance=tmp_nopreload/instance)
installcheck-nopreload:
	$(pg_regress_installcheck) $(NOPRELOAD_OPTS) nopreload

# The TAP tests alone (pgvector's name for it); PROVE_TESTS picks the files.
prove_installcheck:
	$(prove_installcheck)

# The token codec's unit tests: pure C, no server.
unitcheck: test/unit/token_test
	test/unit/token_test
test/unit/token_test: test/unit/token_test.c src/token.c src/token.h
	$(CC) -O2 -Wall -Wextra -Werror -Isrc -o $@ test/unit/token_test.c src/token.c -lsodium

# An installable tarball of the committed tree: apikeys-VERSION.tar.gz.
dist:
	git archive --format=tar.gz --prefix=$(EXTENSION)-$(EXTVERSION)/ -o $(EXTENSION)-$(EXTVERSION).tar.gz HEAD

.PHONY: installcheck-nopreload prove_installcheck unitcheck dist

# The client examples' tests (test/clients): a private cluster, Python with python3-psycopg.
clientcheck:
	bash test/clients/run.sh
.PHONY: clientcheck
