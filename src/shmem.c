/*
 * shmem.c — the shared-memory queue of audit records and the worker registry.
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

#include "access/xlog.h"
#include "common/hashfn.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "storage/shmem.h"
#include "utils/hsearch.h"
#include "utils/timestamp.h"

#include "launcher.h"
#include "shmem.h"
#include "usage.h"

ApikeysShared *apikeys_shared = NULL;
int			apikeys_audit_queue_size = 1024;

static HTAB *event_queue = NULL;
static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;


/* Reserves the queue, the registry and the usage table (postmaster, preload only). */
static void
apikeys_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(ApikeysShared)));
	RequestAddinShmemSpace(hash_estimate_size(apikeys_audit_queue_size, sizeof(QueuedEvent)));
	RequestNamedLWLockTranche("apikeys queue", 1);
	usage_shmem_request();
	launcher_shmem_request();
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

/* Attaches to (or creates) the queue, the registry and the usage table. */
static void
apikeys_shmem_startup(void)
{
	bool		found;
	HASHCTL		info;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	apikeys_shared = ShmemInitStruct("apikeys", sizeof(ApikeysShared), &found);
	if (!found)
	{
		memset(apikeys_shared, 0, sizeof(ApikeysShared));
		apikeys_shared->lock = &GetNamedLWLockTranche("apikeys queue")[0].lock;
	}
	memset(&info, 0, sizeof(info));
	info.keysize = sizeof(QueuedEventKey);
	info.entrysize = sizeof(QueuedEvent);
	info.hash = queue_key_hash;
	info.match = queue_key_match;
	event_queue = ShmemInitHash("apikeys event queue",
								apikeys_audit_queue_size, apikeys_audit_queue_size,
								&info, HASH_ELEM | HASH_FUNCTION | HASH_COMPARE);
	usage_shmem_init();
	launcher_shmem_init();
	LWLockRelease(AddinShmemInitLock);
}

/* Installs the shared-memory hooks (from _PG_init, preload only). */
void
apikeys_shmem_init_hooks(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = apikeys_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = apikeys_shmem_startup;
}

void
queue_key_init(QueuedEventKey *key, QueuedEventKind kind)
{
	/* Padding included: the fixed part is hashed and compared as bytes. */
	memset(key, 0, sizeof(QueuedEventKey));
	key->kind = kind;
	key->dboid = MyDatabaseId;
	key->minute = (int64) (time(NULL) / 60);
}

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

	for (int i = 0; i < APIKEYS_BUDGET_SLOTS; i++)
	{
		AnonymousBudget *b = &apikeys_shared->budgets[i];

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
	if (hash_get_num_entries(event_queue) >= apikeys_audit_queue_size)
		return NULL;
	if (anonymous && apikeys_shared->anonymous_entries >= anonymous_room)
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
		apikeys_shared->anonymous_entries++;
	return entry;
}

/* Caller holds the queue lock exclusively. */
static bool
enqueue_locked(const QueuedEvent *ev)
{
	QueuedEvent *entry;
	/* A flood's prefix records leave an eighth of their half for overflow records. */
	int			anonymous_half = apikeys_audit_queue_size / 2;

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
		apikeys_shared->dropped += ev->count;
		return false;
	}
	entry->count += ev->count;
	apikeys_shared->queued_total += ev->count;
	return true;
}

bool
apikeys_enqueue(const QueuedEvent *ev)
{
	bool		queued;

	if (apikeys_shared == NULL || event_queue == NULL)
		return false;

	LWLockAcquire(apikeys_shared->lock, LW_EXCLUSIVE);
	queued = enqueue_locked(ev);
	LWLockRelease(apikeys_shared->lock);
	return queued;
}

int
apikeys_dequeue(Oid dboid, QueuedEvent *out, int max)
{
	HASH_SEQ_STATUS status;
	QueuedEvent *entry;
	int			n = 0;

	if (apikeys_shared == NULL)
		return 0;

	LWLockAcquire(apikeys_shared->lock, LW_EXCLUSIVE);
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
			apikeys_shared->anonymous_entries--;
		/* Removing the element just returned is allowed during a scan. */
		hash_search(event_queue, &entry->key, HASH_REMOVE, NULL);
	}
	LWLockRelease(apikeys_shared->lock);
	return n;
}

void
apikeys_requeue(const QueuedEvent *events, int n)
{
	LWLockAcquire(apikeys_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < n; i++)
	{
		QueuedEvent *entry = hash_search(event_queue, &events[i].key, HASH_FIND, NULL);

		/* Admitted once already: no cap applies, only the queue's size. */
		if (entry == NULL)
			entry = enter_record(&events[i].key, &events[i], apikeys_audit_queue_size);
		if (entry == NULL)
			apikeys_shared->dropped += events[i].count;
		else
			entry->count += events[i].count;
	}
	LWLockRelease(apikeys_shared->lock);
}

int
apikeys_queued_for(Oid dboid)
{
	HASH_SEQ_STATUS status;
	QueuedEvent *entry;
	int			n = 0;

	LWLockAcquire(apikeys_shared->lock, LW_SHARED);
	hash_seq_init(&status, event_queue);
	while ((entry = hash_seq_search(&status)) != NULL)
		if (entry->key.dboid == dboid)
			n++;
	LWLockRelease(apikeys_shared->lock);
	return n;
}

/* Queue totals for status(). */
void
apikeys_queue_stats(int64 *queued_now, int64 *queued_total, int64 *dropped, int64 *lost)
{
	*queued_now = *queued_total = *dropped = *lost = 0;
	if (apikeys_shared == NULL)
		return;
	LWLockAcquire(apikeys_shared->lock, LW_SHARED);
	*queued_now = hash_get_num_entries(event_queue);
	*queued_total = apikeys_shared->queued_total;
	*dropped = apikeys_shared->dropped;
	*lost = apikeys_shared->lost;
	LWLockRelease(apikeys_shared->lock);
}

/* Whether the database has queued records; caller holds the queue lock. */
static bool
queue_has_records(Oid dboid)
{
	HASH_SEQ_STATUS status;
	QueuedEvent *entry;

	hash_seq_init(&status, event_queue);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		if (entry->key.dboid == dboid)
		{
			hash_seq_term(&status);
			return true;
		}
	}
	return false;
}

bool
apikeys_has_pending(Oid dboid)
{
	bool		pending;

	LWLockAcquire(apikeys_shared->lock, LW_SHARED);
	pending = queue_has_records(dboid) || usage_has_pending(dboid);
	LWLockRelease(apikeys_shared->lock);
	return pending;
}

void
apikeys_discard_database(Oid dboid)
{
	HASH_SEQ_STATUS status;
	QueuedEvent *entry;

	LWLockAcquire(apikeys_shared->lock, LW_EXCLUSIVE);
	hash_seq_init(&status, event_queue);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		if (entry->key.dboid != dboid)
			continue;
		apikeys_shared->lost += entry->count;
		if (is_anonymous(&entry->key))
			apikeys_shared->anonymous_entries--;
		hash_search(event_queue, &entry->key, HASH_REMOVE, NULL);
	}
	LWLockRelease(apikeys_shared->lock);
	usage_discard(dboid);
}

List *
apikeys_databases_with_work(void)
{
	HASH_SEQ_STATUS status;
	QueuedEvent *entry;
	List	   *dboids = NIL;

	LWLockAcquire(apikeys_shared->lock, LW_SHARED);
	hash_seq_init(&status, event_queue);
	while ((entry = hash_seq_search(&status)) != NULL)
		dboids = list_append_unique_oid(dboids, entry->key.dboid);
	LWLockRelease(apikeys_shared->lock);
	return usage_databases_with_counts(dboids);
}
