/*
 * shmem.h — apikeys' shared memory (library preloaded only): the queue of
 * audit records that must survive the caller's rollback.  Usage counters
 * live in usage.h, the registry of workers in launcher.h.
 */
#ifndef APIKEYS_SHMEM_H
#define APIKEYS_SHMEM_H

#include "postgres.h"

#include "mb/pg_wchar.h"
#include "nodes/pg_list.h"
#include "storage/lwlock.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

/* Owners, names and recorded actors are at most this many characters. */
#define APIKEYS_TEXT_MAX_CHARS	200
/* Plan names are at most this many characters. */
#define APIKEYS_PLAN_MAX_CHARS	63

/* Bytes that hold such text whole in any server encoding, with its NUL. */
#define QUEUE_TEXT_LEN		(APIKEYS_TEXT_MAX_CHARS * MAX_MULTIBYTE_CHAR_LEN + 1)
#define QUEUE_PLAN_LEN		(APIKEYS_PLAN_MAX_CHARS * MAX_MULTIBYTE_CHAR_LEN + 1)
#define QUEUE_PREFIX_LEN	25	/* a token prefix (<= 24) and its NUL */
#define QUEUE_START_LEN		30	/* a token's start (<= 29) and its NUL */

/* Databases whose anonymous records this minute are counted at once. */
#define APIKEYS_BUDGET_SLOTS	64

/*
 * Refusals of unknown or malformed tokens name no key: per database and
 * minute, at most this many distinct prefixes get a record of their own;
 * the rest are counted in one overflow record.
 */
#define APIKEYS_ANONYMOUS_PREFIXES_PER_MINUTE 100

typedef enum QueuedEventKind
{
	EVENT_VERIFY_FAILED = 1,
	EVENT_LIMIT_EXCEEDED,
	EVENT_USAGE_ALERT
} QueuedEventKind;

/*
 * What records merge on: one row per kind, key (or prefix, or owner and
 * plan), reason and minute.  Built by queue_key_init(): the fixed part is
 * compared as bytes and the strings up to their NUL.
 */
typedef struct QueuedEventKey
{
	Oid			dboid;
	int32		kind;
	int32		reason;			/* verify_failed: the verify code */
	int64		minute;			/* Unix time / 60 */
	pg_uuid_t	key_id;			/* all zero when no key is known */
	int32		max_keys;		/* limit_exceeded: the plan's limit */
	bool		overflow;		/* refusals past the per-minute prefix cap */
	char		prefix[QUEUE_PREFIX_LEN];	/* unknown token's prefix; "" if malformed */
	char		owner[QUEUE_TEXT_LEN];
	char		plan[QUEUE_PLAN_LEN];
} QueuedEventKey;

typedef struct QueuedEvent
{
	QueuedEventKey key;
	int64		count;
	int64		requests;		/* usage_alert: requests this minute */
	int32		threshold;		/* usage_alert: the threshold passed */
	char		start[QUEUE_START_LEN];	/* usage_alert: the key's start */
	char		actor[QUEUE_TEXT_LEN];
	char		db_user[NAMEDATALEN];
} QueuedEvent;

/* How many anonymous records one database has started in one minute. */
typedef struct AnonymousBudget
{
	Oid			dboid;
	int64		minute;
	int32		used;
} AnonymousBudget;

typedef struct ApikeysShared
{
	LWLock	   *lock;			/* the queue */
	int64		queued_total;
	int64		dropped;		/* occurrences not queued: the queue was full */
	int64		lost;			/* occurrences discarded: their database or extension went */
	int32		anonymous_entries;	/* queue entries that name no key or owner */
	AnonymousBudget budgets[APIKEYS_BUDGET_SLOTS];
} ApikeysShared;

/* NULL unless the library was preloaded. */
extern ApikeysShared *apikeys_shared;

/* GUC apikeys.audit_queue_size: records the queue holds. */
extern int	apikeys_audit_queue_size;

extern void apikeys_shmem_init_hooks(void);

/* Zeroes a key and sets what every record has. */
extern void queue_key_init(QueuedEventKey *key, QueuedEventKind kind);

/* Copies text into a queue field of size bytes, cut at a character boundary. */
extern void queue_copy_text(char *dst, size_t size, const char *src);

/*
 * Adds one occurrence (ev->count of them) to the queue, merging with a
 * record of the same key.  Never raises.  Records that name no key or
 * owner use at most half the queue, and past the per-minute prefix cap
 * fold into one overflow record; a full queue counts a drop.  Returns
 * false when dropped.
 */
extern bool apikeys_enqueue(const QueuedEvent *ev);

/* Moves up to max records of one database out of the queue; returns how many. */
extern int	apikeys_dequeue(Oid dboid, QueuedEvent *out, int max);

/* Puts records a failed write had taken back into the queue. */
extern void apikeys_requeue(const QueuedEvent *events, int n);

/* Records of the database queued now. */
extern int	apikeys_queued_for(Oid dboid);

/* Whether the database has queued records or usage counts to write. */
extern bool apikeys_has_pending(Oid dboid);

/*
 * Discards what a database that is gone had queued (records are counted as
 * lost) and its usage counts.
 */
extern void apikeys_discard_database(Oid dboid);

/* The databases with queued records or usage counts (a list of OIDs). */
extern List *apikeys_databases_with_work(void);

/* Queue totals for status(). */
extern void apikeys_queue_stats(int64 *queued_now, int64 *queued_total, int64 *dropped,
								int64 *lost);

#endif							/* APIKEYS_SHMEM_H */
