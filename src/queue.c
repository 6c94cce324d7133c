/*
 * queue.c — the shared-memory queue of audit records that must survive the
 * caller's rollback (library preloaded only), until a worker writes them.
 *
 * The queue is a fixed-size shared hash keyed by what records merge on, so a
 * flood of identical failures costs one entry.  Records that name no key or
 * owner (unknown and malformed tokens, which anyone can mint) may use half
 * of it, and each database starts at most
 * APIKEYS_ANONYMOUS_PREFIXES_PER_MINUTE of them a minute; past that they are
 * counted in one overflow record, so a flood neither crowds out records
 * that name a key or owner nor grows the audit log without bound.  When the
 * queue is full, new records are counted as dropped rather than waited
 * for.  The lock is held only for a hash probe or to copy entries, never
 * across I/O.
 */
#include "postgres.h"

#include <time.h>

#include "common/hashfn.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/procarray.h"
#include "utils/guc.h"

#include "queue.h"

/*
 * Refusals of unknown or malformed tokens name no key: per database and
 * minute, at most this many distinct prefixes get a record of their own;
 * the rest are counted in one overflow record.
 */
#define APIKEYS_ANONYMOUS_PREFIXES_PER_MINUTE 100

/* Databases whose anonymous records this minute are counted at once. */
#define BUDGET_SLOTS	64

/* How many anonymous records one database has started in one minute. */
typedef struct AnonymousBudget
{
	Oid			dboid;
	int64		minute;
	int32		used;
} AnonymousBudget;

/* The queue's counters and lock; its records are in event_queue. */
typedef struct QueueShared
{
	LWLock	   *lock;
	int64		queued_total;
	int64		dropped;		/* occurrences not queued: the queue was full */
	int64		lost;			/* occurrences discarded: their database or extension went */
	int32		anonymous_entries;	/* records that name no key or owner */
	AnonymousBudget budgets[BUDGET_SLOTS];
} QueueShared;

/* GUC apikeys.audit_queue_size: records the queue holds. */
static int	audit_queue_size = 1024;

static QueueShared *queue = NULL;
static HTAB *event_queue = NULL;
static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* Reserves the queue and its lock (postmaster). */
static void
queue_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(QueueShared)));
	RequestAddinShmemSpace(hash_estimate_size(audit_queue_size, sizeof(QueuedEvent)));
	RequestNamedLWLockTranche("apikeys queue", 1);
}

/* Hashes a queue key: its fixed part as bytes, its strings up to their NUL. */
static uint32
queue_key_hash(const void *key, Size keysize)
{
	const QueuedEventKey *k = key;
	uint32		h = hash_bytes((const unsigned char *) k, offsetof(QueuedEventKey, prefix));

	h = hash_combine(h, string_hash(k->prefix, sizeof(k->prefix)));
	h = hash_combine(h, string_hash(k->owner, sizeof(k->owner)));
	return hash_combine(h, string_hash(k->plan, sizeof(k->plan)));
}

/* Compares two queue keys as queue_key_hash() reads them; 0 when equal. */
static int
queue_key_match(const void *key1, const void *key2, Size keysize)
{
	const QueuedEventKey *a = key1;
	const QueuedEventKey *b = key2;

	if (memcmp(a, b, offsetof(QueuedEventKey, prefix)) != 0)
		return 1;
	return strcmp(a->prefix, b->prefix) != 0 || strcmp(a->owner, b->owner) != 0 ||
		strcmp(a->plan, b->plan) != 0;
}

/* Attaches to (or creates) the queue. */
static void
queue_shmem_startup(void)
{
	bool		found;
	HASHCTL		info;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	queue = ShmemInitStruct("apikeys queue", sizeof(QueueShared), &found);
	if (!found)
	{
		memset(queue, 0, sizeof(QueueShared));
		queue->lock = &GetNamedLWLockTranche("apikeys queue")[0].lock;
	}
	memset(&info, 0, sizeof(info));
	info.keysize = sizeof(QueuedEventKey);
	info.entrysize = sizeof(QueuedEvent);
	info.hash = queue_key_hash;
	info.match = queue_key_match;
	event_queue = ShmemInitHash("apikeys event queue",
								audit_queue_size, audit_queue_size,
								&info, HASH_ELEM | HASH_FUNCTION | HASH_COMPARE);
	LWLockRelease(AddinShmemInitLock);
}

/*
 * Defines apikeys.audit_queue_size and reserves the queue (from _PG_init,
 * preload only: shared memory is sized at server start).
 */
void
queue_init(void)
{
	DefineCustomIntVariable("apikeys.audit_queue_size",
							"Distinct audit records shared memory holds between flushes.",
							NULL,
							&audit_queue_size,
							1024, 16, 1048576,
							PGC_POSTMASTER,
							0,
							NULL, NULL, NULL);
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = queue_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = queue_shmem_startup;
}

/* Whether the queue exists: the library was preloaded. */
bool
queue_available(void)
{
	return queue != NULL;
}

/* Zeroes a key and sets what every record has. */
void
queue_key_init(QueuedEventKey *key, QueuedEventKind kind)
{
	/* Padding included: the fixed part is hashed and compared as bytes. */
	memset(key, 0, sizeof(QueuedEventKey));
	key->kind = kind;
	key->dboid = MyDatabaseId;
	key->minute = (int64) (time(NULL) / 60);
}

/* Copies text into a queue field of size bytes, cut at a character boundary. */
void
queue_copy_text(char *dst, size_t size, const char *src)
{
	int			len = src ? (int) strlen(src) : 0;

	if (len >= (int) size)
		len = pg_mbcliplen(src, len, (int) size - 1);
	if (len > 0)
		memcpy(dst, src, len);
	dst[len] = '\0';
}

/* A record that names neither a key nor an owner: an unknown or malformed token. */
static inline bool
is_anonymous(const QueuedEventKey *key)
{
	static const pg_uuid_t no_key;

	return key->kind == EVENT_VERIFY_FAILED &&
		memcmp(&key->key_id, &no_key, sizeof(pg_uuid_t)) == 0;
}

/*
 * Whether the database may start one more anonymous record this minute.
 * Caller holds the queue lock exclusively.
 */
static bool
take_anonymous_budget(Oid dboid, int64 minute)
{
	AnonymousBudget *free_slot = NULL;

	for (int i = 0; i < BUDGET_SLOTS; i++)
	{
		AnonymousBudget *b = &queue->budgets[i];

		if (b->dboid == dboid)
		{
			if (b->minute != minute)
			{
				b->minute = minute;
				b->used = 0;
			}
			if (b->used >= APIKEYS_ANONYMOUS_PREFIXES_PER_MINUTE)
				return false;
			b->used++;
			return true;
		}
		if (free_slot == NULL && (b->dboid == InvalidOid || b->minute != minute))
			free_slot = b;
	}
	if (free_slot == NULL)
		return false;			/* more databases refusing tokens this minute than slots */
	free_slot->dboid = dboid;
	free_slot->minute = minute;
	free_slot->used = 1;
	return true;
}

/*
 * Enters a record for a key not in the queue, its payload copied from
 * payload with a count of zero; NULL when the queue, or the share of it
 * that records naming no key or owner may use, is full.
 */
static QueuedEvent *
enter_record(const QueuedEventKey *key, const QueuedEvent *payload, int anonymous_room)
{
	QueuedEvent *entry;
	bool		anonymous = is_anonymous(key);
	bool		found;

	/* A shared hash can outgrow its size into spare shared memory: cap it. */
	if (hash_get_num_entries(event_queue) >= audit_queue_size)
		return NULL;
	if (anonymous && queue->anonymous_entries >= anonymous_room)
		return NULL;
	entry = hash_search(event_queue, key, HASH_ENTER_NULL, &found);
	if (entry == NULL)
		return NULL;
	Assert(!found);
	memcpy((char *) entry + offsetof(QueuedEvent, count),
		   (const char *) payload + offsetof(QueuedEvent, count),
		   sizeof(QueuedEvent) - offsetof(QueuedEvent, count));
	entry->count = 0;
	if (anonymous)
		queue->anonymous_entries++;
	return entry;
}

/* Adds one record's occurrences; caller holds the queue lock exclusively. */
static bool
enqueue_locked(const QueuedEvent *ev)
{
	QueuedEvent *entry;
	/* A flood's prefix records leave an eighth of their half for overflow records. */
	int			anonymous_half = audit_queue_size / 2;

	entry = hash_search(event_queue, &ev->key, HASH_FIND, NULL);
	if (entry == NULL && is_anonymous(&ev->key) && !ev->key.overflow)
	{
		if (take_anonymous_budget(ev->key.dboid, ev->key.minute))
			entry = enter_record(&ev->key, ev, anonymous_half - anonymous_half / 8);
		if (entry == NULL)
		{
			/* Past the cap: counted in the database's overflow record for the minute. */
			QueuedEventKey overflow;

			queue_key_init(&overflow, EVENT_VERIFY_FAILED);
			overflow.dboid = ev->key.dboid;
			overflow.minute = ev->key.minute;
			overflow.reason = ev->key.reason;
			overflow.overflow = true;
			entry = hash_search(event_queue, &overflow, HASH_FIND, NULL);
			if (entry == NULL)
				entry = enter_record(&overflow, ev, anonymous_half);
		}
	}
	else if (entry == NULL)
		entry = enter_record(&ev->key, ev, anonymous_half);

	if (entry == NULL)
	{
		queue->dropped += ev->count;
		return false;
	}
	entry->count += ev->count;
	queue->queued_total += ev->count;
	return true;
}

/* Adds one record's occurrences, merging with a record of the same key. */
bool
queue_add(const QueuedEvent *ev)
{
	bool		queued;

	if (queue == NULL)
		return false;

	LWLockAcquire(queue->lock, LW_EXCLUSIVE);
	queued = enqueue_locked(ev);
	LWLockRelease(queue->lock);
	return queued;
}

/* Moves up to max records of one database out of the queue. */
int
queue_take(Oid dboid, QueuedEvent *out, int max)
{
	HASH_SEQ_STATUS status;
	QueuedEvent *entry;
	int			n = 0;

	LWLockAcquire(queue->lock, LW_EXCLUSIVE);
	hash_seq_init(&status, event_queue);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		if (entry->key.dboid != dboid)
			continue;
		if (n >= max)
		{
			hash_seq_term(&status);
			break;
		}
		out[n++] = *entry;
		if (is_anonymous(&entry->key))
			queue->anonymous_entries--;
		/* Removing the element just returned is allowed during a scan. */
		hash_search(event_queue, &entry->key, HASH_REMOVE, NULL);
	}
	LWLockRelease(queue->lock);
	return n;
}

/* Puts back records a failed write had taken. */
void
queue_put_back(const QueuedEvent *events, int n)
{
	LWLockAcquire(queue->lock, LW_EXCLUSIVE);
	for (int i = 0; i < n; i++)
	{
		QueuedEvent *entry = hash_search(event_queue, &events[i].key, HASH_FIND, NULL);

		/* Admitted once already: no cap applies, only the queue's size. */
		if (entry == NULL)
			entry = enter_record(&events[i].key, &events[i], audit_queue_size);
		if (entry == NULL)
			queue->dropped += events[i].count;
		else
			entry->count += events[i].count;
	}
	LWLockRelease(queue->lock);
}

/* Counts as lost records taken from the queue that have nowhere to go (their extension is gone). */
void
queue_note_lost(const QueuedEvent *events, int n)
{
	int64		count = 0;

	for (int i = 0; i < n; i++)
		count += events[i].count;
	LWLockAcquire(queue->lock, LW_EXCLUSIVE);
	queue->lost += count;
	LWLockRelease(queue->lock);
}

/* Records of one database queued now. */
int
queue_count(Oid dboid)
{
	HASH_SEQ_STATUS status;
	QueuedEvent *entry;
	int			n = 0;

	LWLockAcquire(queue->lock, LW_SHARED);
	hash_seq_init(&status, event_queue);
	while ((entry = hash_seq_search(&status)) != NULL)
		if (entry->key.dboid == dboid)
			n++;
	LWLockRelease(queue->lock);
	return n;
}

/* Queue totals for status(); zeros without the preload. */
void
queue_stats(int64 *queued_now, int64 *queued_total, int64 *dropped, int64 *lost)
{
	*queued_now = *queued_total = *dropped = *lost = 0;
	if (queue == NULL)
		return;
	LWLockAcquire(queue->lock, LW_SHARED);
	*queued_now = hash_get_num_entries(event_queue);
	*queued_total = queue->queued_total;
	*dropped = queue->dropped;
	*lost = queue->lost;
	LWLockRelease(queue->lock);
}

/* Whether the database has queued records. */
bool
queue_has_records(Oid dboid)
{
	HASH_SEQ_STATUS status;
	QueuedEvent *entry;
	bool		found = false;

	LWLockAcquire(queue->lock, LW_SHARED);
	hash_seq_init(&status, event_queue);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		if (entry->key.dboid == dboid)
		{
			hash_seq_term(&status);
			found = true;
			break;
		}
	}
	LWLockRelease(queue->lock);
	return found;
}

/* Discards the records of a database that is gone, counting them as lost. */
void
queue_discard(Oid dboid)
{
	HASH_SEQ_STATUS status;
	QueuedEvent *entry;

	LWLockAcquire(queue->lock, LW_EXCLUSIVE);
	hash_seq_init(&status, event_queue);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		if (entry->key.dboid != dboid)
			continue;
		queue->lost += entry->count;
		if (is_anonymous(&entry->key))
			queue->anonymous_entries--;
		hash_search(event_queue, &entry->key, HASH_REMOVE, NULL);
	}
	LWLockRelease(queue->lock);
}

/* Adds the databases that have queued records to a list of OIDs (no duplicates). */
List *
queue_databases(List *dboids)
{
	HASH_SEQ_STATUS status;
	QueuedEvent *entry;

	LWLockAcquire(queue->lock, LW_SHARED);
	hash_seq_init(&status, event_queue);
	while ((entry = hash_seq_search(&status)) != NULL)
		dboids = list_append_unique_oid(dboids, entry->key.dboid);
	LWLockRelease(queue->lock);
	return dboids;
}
