/*
 * worker.h — per-database background workers that write queued audit
 * records into the database where they arose.
 */
#ifndef APIKEYS_WORKER_H
#define APIKEYS_WORKER_H

#include "postgres.h"

/* GUC apikeys.flush_interval, in seconds. */
extern int	apikeys_flush_interval;

/* Registers this database's worker (its slot already reserved); false if no process is free. */
extern bool apikeys_start_worker(void);

PGDLLEXPORT void apikeys_worker_main(Datum main_arg);

#endif							/* APIKEYS_WORKER_H */
