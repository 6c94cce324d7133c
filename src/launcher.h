/*
 * launcher.h — the launcher that starts, watches and retires one
 * background worker per database with records or counts to write, and the
 * registry of those workers in shared memory (library preloaded only).
 */
#ifndef APIKEYS_LAUNCHER_H
#define APIKEYS_LAUNCHER_H

#include "postgres.h"

/* Reserves the registry and registers the launcher (from _PG_init, preload only). */
extern void launcher_init(void);

/* Whether a database has queued records or usage counts to write. */
extern bool launcher_database_has_work(Oid dboid);

/*
 * In a backend, after queuing a record or counting a request: makes sure
 * the launcher knows this database has something to write.  Costs an
 * atomic read while the database has a worker.
 */
extern void launcher_note_pending(void);

/* Asks the database's worker, if one runs, to flush now (an alert is waiting). */
extern void launcher_wake_worker(Oid dboid);

/* In a worker, once connected: takes its registry slot; false if it is not its own. */
extern bool registry_claim(Oid dboid);

/*
 * In a worker: whether a flush was asked for since the last call, and
 * whether it should write usage counts too.
 */
extern bool registry_take_flush_request(Oid dboid, bool *with_usage, uint64 *sessions);

/* In a worker: a flush begins (returns its number) and completes. */
extern uint64 registry_flush_starting(Oid dboid);
extern void registry_flush_done(Oid dboid, uint64 seq);

/* Counts a flush that failed and was put back. */
extern void registry_count_flush_failure(void);

/* Workers running now, failed starts and failed flushes since server start. */
extern void launcher_stats(int64 *workers, int64 *start_failures, int64 *flush_failures);

PGDLLEXPORT void apikeys_launcher_main(Datum main_arg);

#endif							/* APIKEYS_LAUNCHER_H */
