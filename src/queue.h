/*
 * queue.h — the shared-memory queue of audit records that must survive the
 * caller's rollback (library preloaded only).
 */
#ifndef APIKEYS_QUEUE_H
#define APIKEYS_QUEUE_H

#include "postgres.h"

#include "mb/pg_wchar.h"
#include "nodes/pg_list.h"
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

/* Defines apikeys.audit_queue_size and reserves the queue (from _PG_init, preload only). */
extern void queue_init(void);

/* Whether the queue exists: the library was preloaded. */
extern bool queue_available(void);

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
extern bool queue_add(const QueuedEvent *ev);

/* Moves up to max records of one database out of the queue; returns how many. */
extern int	queue_take(Oid dboid, QueuedEvent *out, int max);

/* Puts records a failed write had taken back into the queue. */
extern void queue_put_back(const QueuedEvent *events, int n);

/* Records of the database queued now. */
extern int	queue_count(Oid dboid);

/* Whether the database has queued records. */
extern bool queue_has_records(Oid dboid);

/* Counts as lost records taken from the queue that have nowhere to go. */
extern void queue_note_lost(const QueuedEvent *events, int n);

/* Discards the records of a database that is gone (counted as lost). */
extern void queue_discard(Oid dboid);

/* Adds the databases that have queued records to a list of OIDs (no duplicates). */
extern List *queue_databases(List *dboids);

/* Queue totals for status(); zeros without the preload. */
extern void queue_stats(int64 *queued_now, int64 *queued_total, int64 *dropped, int64 *lost);

#endif							/* APIKEYS_QUEUE_H */
