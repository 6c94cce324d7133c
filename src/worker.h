/*
 * worker.h — the per-database background worker that writes queued audit
 * records and usage counts into the database where they arose.
 */
#ifndef APIKEYS_WORKER_H
#define APIKEYS_WORKER_H

#include "postgres.h"

/* GUC apikeys.flush_interval, in seconds: how often queued audit records are written. */
extern int	apikeys_flush_interval;
/* GUC apikeys.usage_flush_interval, in seconds: how often usage counts are written. */
extern int	apikeys_usage_flush_interval;

PGDLLEXPORT void apikeys_worker_main(Datum main_arg);

#endif							/* APIKEYS_WORKER_H */
