/*
 * shmem.h — apikeys' shared memory (library preloaded only): the queue of
 * audit records that must survive the caller's rollback, and the registry of
 * per-database background workers.
 */
#ifndef APIKEYS_SHMEM_H
#define APIKEYS_SHMEM_H

#include "postgres.h"

#include "storage/lwlock.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#define APIKEYS_SUBJECT_LEN		208	/* an owner (<= 200 bytes) or a prefix */
#define APIKEYS_DETAILS_LEN		256
#define APIKEYS_MAX_DB_WORKERS	64

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
} WorkerSlot;

typedef struct ApikeysShared
{
	LWLock	   *lock;
	int64		queued_total;
	int64		dropped;
	WorkerSlot	workers[APIKEYS_MAX_DB_WORKERS];
} ApikeysShared;

/* NULL unless the library was preloaded. */
extern ApikeysShared *apikeys_shared;

/* GUC apikeys.audit_queue_size: records the queue holds. */
extern int	apikeys_audit_queue_size;

extern void apikeys_shmem_init_hooks(void);

typedef enum EnqueueResult
{
	ENQUEUE_DROPPED,
	ENQUEUE_QUEUED,
	ENQUEUE_QUEUED_START_WORKER	/* the caller must start the database's worker */
} EnqueueResult;

/*
 * Adds one occurrence to the queue, merging with a record of the same key.
 * Never raises; a full queue counts a drop.  When the record's database has
 * no worker, reserves its slot and asks the caller to start one.
 */
extern EnqueueResult apikeys_enqueue(const QueuedEventKey *key, const char *owner,
									 const char *actor, const char *db_user,
									 const char *details);

/* Frees a worker slot reserved by apikeys_enqueue whose worker did not start. */
extern void apikeys_release_reserved_slot(Oid dboid);

/* Takes this database's slot for the calling worker; false if another has it. */
extern bool apikeys_claim_slot(Oid dboid);

/*
 * Frees the calling worker's slot if its database has nothing queued; true
 * when freed (the worker then exits, and the next record starts a new one).
 */
extern bool apikeys_retire_if_idle(Oid dboid);

/* Frees whatever slot the calling worker holds (at exit). */
extern void apikeys_release_own_slot(void);

/* Moves up to max records of one database out of the queue; returns how many. */
extern int	apikeys_dequeue(Oid dboid, QueuedEvent *out, int max);

/* Records queued now, across databases. */
extern int64 apikeys_queued_now(void);

#endif							/* APIKEYS_SHMEM_H */
