/*
 * worker.h — the per-database background worker that writes queued audit
 * records and usage counts into the database where they arose.
 */
#ifndef APIKEYS_WORKER_H
#define APIKEYS_WORKER_H

#include "postgres.h"

/* Defines the workers' settings (from _PG_init). */
extern void worker_init(void);

PGDLLEXPORT void apikeys_worker_main(Datum main_arg);

#endif							/* APIKEYS_WORKER_H */
