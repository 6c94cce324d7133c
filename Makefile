# apikeys — PGXS build
EXTENSION = apikeys
MODULE_big = apikeys
OBJS = src/apikeys.o src/token.o src/apikey_type.o src/verify.o src/hash.o src/audit.o \
       src/shmem.o src/usage.o src/worker.o src/launcher.o src/loghook.o
DATA = sql/apikeys--1.0.sql
PGFILEDESC = "apikeys - API keys inside PostgreSQL"

REGRESS = token type keys verify limits lifecycle guards roles audit usage secrets search_path
REGRESS_OPTS = --inputdir=. --load-extension=apikeys

SHLIB_LINK = -lsodium
PG_CFLAGS = -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers

# No JIT bitcode: the build needs no clang.
override with_llvm = no

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)
