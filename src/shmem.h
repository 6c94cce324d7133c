/*
 * shmem.h — apikeys' shared memory (library preloaded only): the queue of
 * audit records that must survive the caller's rollback, and the registry of
 * per-database background workers.  Usage counters live in usage.h.
 */
#ifndef APIKEYS_SHMEM_H
#define APIKEYS_SHMEM_H

#include "postgres.h"

#include "port/atomics.h"
#include "storage/lwlock.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#define APIKEYS_SUBJECT_LEN		208	/* an owner (<= 200 bytes) or a prefix */
#define APIKEYS_DETAILS_LEN		512
#define APIKEYS_MAX_DB_WORKERS	64
#define APIKEYS_USAGE_PARTITIONS 16	/* a power of two */

typedef enum QueuedEventKind
{
	EVENT_VERIFY_FAILED = 1,
	EVENT_LIMIT_EXCEEDED,
	EVENT_USAGE_ALERT
} QueuedEventKind;

/* What records merge on: one row per key (or subject), reason and minute. */
typedef struct QueuedEventKey
{
	Oid			dboid;
	int32		kind;
	int32		reason;
	int64		minute;			/* Unix time / 60 */
	pg_uuid_t	key_id;			/* all zero when no key is known */
	char		subject[APIKEYS_SUBJECT_LEN];
} QueuedEventKey;

typedef struct QueuedEvent
{
	QueuedEventKey key;
	int64		count;
	char		owner[APIKEYS_SUBJECT_LEN];
	char		actor[APIKEYS_SUBJECT_LEN];
	char		db_user[NAMEDATALEN];
	char		details[APIKEYS_DETAILS_LEN];	/* JSON object text */
} QueuedEvent;

typedef struct WorkerSlot
{
	Oid			dboid;
	pid_t		pid;			/* 0 while starting */
	TimestampTz requested_at;
	bool		flush_requested;	/* an alert is waiting: flush before the interval ends */
} WorkerSlot;

typedef struct ApikeysShared
{
	LWLock	   *lock;			/* the queue and the registry */
	LWLock	   *usage_locks[APIKEYS_USAGE_PARTITIONS];	/* the usage counters, by hash */
	int64		queued_total;
	int64		dropped;
	/* Bumped whenever a worker may have gone: backends then look again. */
	pg_atomic_uint64 worker_generation;
	WorkerSlot	workers[APIKEYS_MAX_DB_WORKERS];
} ApikeysShared;

/* NULL unless the library was preloaded. */
extern ApikeysShared *apikeys_shared;

/* GUC apikeys.audit_queue_size: records the queue holds. */
extern int	apikeys_audit_queue_size;

extern void apikeys_shmem_init_hooks(void);

/*
 * Adds one occurrence to the queue, merging with a record of the same key.
 * Never raises; a full queue counts a drop.  Returns false when dropped.
 */
extern bool apikeys_enqueue(const QueuedEventKey *key, const char *owner,
							const char *actor, const char *db_user,
							const char *details);

/* Moves up to max records of one database out of the queue; returns how many. */
extern int	apikeys_dequeue(Oid dboid, QueuedEvent *out, int max);

/* Records queued now, across databases. */
extern int64 apikeys_queued_now(void);

/*
 * Called after adding anything a worker must write: makes sure this
 * database's worker runs.  Costs an atomic read while it does.
 */
extern void apikeys_note_pending(void);

/* Takes this database's slot for the calling worker; false if another has it. */
extern bool apikeys_claim_slot(Oid dboid);

/*
 * Frees the calling worker's slot if its database has nothing left to
 * write; true when freed (the worker then exits).
 */
extern bool apikeys_retire_if_idle(Oid dboid);

/* Whether the database has queued records or usage counts to write. */
extern bool apikeys_has_pending(Oid dboid);

/* Frees whatever slot the calling worker holds (at exit). */
extern void apikeys_release_own_slot(void);

/* Asks this database's worker, if it runs, to flush now (an alert is waiting). */
extern void apikeys_wake_worker(Oid dboid);

/* In the worker: whether a flush was asked for since the last call. */
extern bool apikeys_take_flush_request(Oid dboid);

#endif							/* APIKEYS_SHMEM_H */
