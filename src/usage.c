/*
 * usage.c — per-key, per-UTC-day counters in a shared hash.
 *
 * The table is split in USAGE_PARTITIONS by hash, each with its own lock
 * (the module's own tranche), so backends rarely meet.  The hot path takes
 * its partition's lock in shared mode and the entry's spinlock (with an
 * owner-wide limit, the owner's partition too, in ascending order); only a
 * key's first request of the day takes the partition exclusively, to add
 * its entry.  When the table is full, idle entries (nothing pending, not
 * used this minute) make room; if none is idle the request is untracked: it
 * verifies as usual but is neither counted nor rate limited, and status()
 * counts it.
 *
 * A lookup goes first to the fast index, one slot per hash value (the
 * partition's bits kept, so one lock covers a slot and its entries), which
 * holds the entry last found there: verify() prefetches the slot and then
 * the entry while it still reads the key's row, so the count rarely waits
 * for memory.  A slot that names another entry sends the lookup to the hash
 * table, which then republishes it.  Slots change only under their
 * partition's lock (cleared with the entry, exclusively), so a pointer read
 * under the lock names a live entry; one read without it only prefetches.
 */
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "common/hashfn.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/guc.h"
#include "utils/snapmgr.h"

#include "apikeys.h"
#include "fastindex.h"
#include "usage.h"

/* Partitions of the table, each with its own lock (a power of two). */
#define USAGE_PARTITIONS 16

/* GUC apikeys.max_tracked_keys: keys counted at once across databases. */
static int	max_tracked_keys = 100000;
/* GUC apikeys.alert_requests_per_minute: 0 turns alerts off. */
static int	alert_requests_per_minute = 0;

typedef struct UsageKey
{
	Oid			dboid;
	int32		day;			/* days since 1970-01-01, UTC */
	pg_uuid_t	key_id;
} UsageKey;

typedef struct UsageEntry
{
	UsageKey	key;
	slock_t		mutex;
	UsageCounts pending;		/* not yet taken by a flush */
	UsageCounts inflight;		/* taken by a flush that may not have committed */
	TransactionId inflight_xid; /* that flush's transaction, or invalid */
	UsageCounts settled;		/* what the last committed flush wrote, */
	TransactionId settled_xid;	/* for readers whose snapshot missed its commit */
	int64		minute;			/* the minute minute_count belongs to */
	int64		minute_count;	/* requests allowed in that minute (for alerts) */
	int64		alerted_minute;
	TimestampTz tat;			/* rate limit: the GCRA's theoretical arrival time */
	ItemPointerData row;		/* where the worker last wrote the key's row (a hint) */
} UsageEntry;

typedef struct UsageCounters
{
	slock_t		mutex;
	int64		untracked;
	int64		full_scan_minute;	/* under mutex */
} UsageCounters;

/* The day of owners' rate-limit entries: no key's. */
#define OWNER_DAY		(-1)
/* The day of keys' rate-limit entries, one a key whatever the date. */
#define RATE_DAY		(-2)

static HTAB *usage_table = NULL;
/* The fast index: per slot, the address of the entry found there last, or 0. */
static pg_atomic_uint64 *fast_slots = NULL;
static uint32 fast_mask;
static UsageCounters *usage_counters = NULL;
static LWLock *partition_locks[USAGE_PARTITIONS];
static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* Adds counts to counts. */
static inline void
counts_add(UsageCounts *to, const UsageCounts *from)
{
	to->requests += from->requests;
	to->failures += from->failures;
	to->last_used_at = Max(to->last_used_at, from->last_used_at);
}

/* Whether counts hold nothing to write. */
static inline bool
counts_empty(const UsageCounts *c)
{
	return c->requests == 0 && c->failures == 0;
}

/*
 * Hashes an entry's key without its day, so that all of a key's entries
 * (each day's counts and its rate-limit state) share a partition: one lock
 * covers them together.  Keys compare as bytes (padding zeroed).
 */
static uint32
usage_hash(const void *key, Size keysize)
{
	const UsageKey *k = (const UsageKey *) key;

	return hash_combine(hash_bytes_uint32((uint32) k->dboid),
						hash_bytes((const unsigned char *) &k->key_id, sizeof(pg_uuid_t)));
}

/* Slots of the fast index: a power of two, at least twice the entries, so that few share one. */
static uint32
fast_slot_count(void)
{
	return pg_nextpower2_32((uint32) Max(max_tracked_keys, USAGE_PARTITIONS) * 2);
}

/* Reserves the table and its partition locks, a tranche of their own (postmaster). */
static void
usage_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(add_size(add_size(MAXALIGN(sizeof(UsageCounters)),
											 hash_estimate_size(max_tracked_keys, sizeof(UsageEntry))),
									mul_size(fast_slot_count(), sizeof(pg_atomic_uint64))));
	RequestNamedLWLockTranche("apikeys usage", USAGE_PARTITIONS);
}

/* Attaches to (or creates) the table. */
static void
usage_shmem_startup(void)
{
	HASHCTL		info;
	bool		found;
	LWLockPadded *locks;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	locks = GetNamedLWLockTranche("apikeys usage");
	for (int i = 0; i < USAGE_PARTITIONS; i++)
		partition_locks[i] = &locks[i].lock;
	usage_counters = ShmemInitStruct("apikeys usage counters", sizeof(UsageCounters), &found);
	if (!found)
	{
		SpinLockInit(&usage_counters->mutex);
		usage_counters->untracked = 0;
		usage_counters->full_scan_minute = 0;
	}
	memset(&info, 0, sizeof(info));
	info.keysize = sizeof(UsageKey);
	info.entrysize = sizeof(UsageEntry);
	info.hash = usage_hash;
	info.num_partitions = USAGE_PARTITIONS;
	usage_table = ShmemInitHash("apikeys usage", max_tracked_keys,
								max_tracked_keys, &info,
								HASH_ELEM | HASH_FUNCTION | HASH_PARTITION);
	fast_mask = fast_slot_count() - 1;
	fast_slots = ShmemInitStruct("apikeys usage fast index",
								 mul_size(fast_slot_count(), sizeof(pg_atomic_uint64)), &found);
	if (!found)
		for (uint32 i = 0; i <= fast_mask; i++)
			pg_atomic_init_u64(&fast_slots[i], 0);
	LWLockRelease(AddinShmemInitLock);
}

/*
 * Defines the usage settings and, with the preload, reserves the table
 * (from _PG_init).  Alerts can be set anywhere; the table's size only at
 * server start.
 */
void
usage_init(void)
{
	DefineCustomIntVariable("apikeys.alert_requests_per_minute",
							"Requests in a minute past which a key raises a usage alert (0: off).",
							NULL,
							&alert_requests_per_minute,
							0, 0, INT_MAX,
							PGC_SIGHUP,
							0,
							NULL, NULL, NULL);
	if (!process_shared_preload_libraries_in_progress)
		return;
	DefineCustomIntVariable("apikeys.max_tracked_keys",
							"Keys whose usage shared memory counts at once, across databases.",
							NULL,
							&max_tracked_keys,
							100000, 100, 10000000,
							PGC_POSTMASTER,
							0,
							NULL, NULL, NULL);
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = usage_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = usage_shmem_startup;
}

/* apikeys.max_tracked_keys: keys counted at once (the row locator sizes itself by it). */
int
usage_max_tracked_keys(void)
{
	return max_tracked_keys;
}

/* Now, its Unix minute and its UTC day. */
static void
now_parts(TimestampTz *now, int64 *minute, int32 *day)
{
	int64		unix_seconds;

	*now = GetCurrentTimestamp();
	unix_seconds = *now / USECS_PER_SEC +
		(POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY;
	*minute = unix_seconds / 60;
	*day = (int32) (unix_seconds / SECS_PER_DAY);
}

/*
 * Whether an entry has nothing to write, was not used this minute, and
 * holds no rate-limit state that still matters (forgetting a future
 * theoretical arrival time would hand the key a fresh burst).
 */
static inline bool
entry_idle(UsageEntry *e, int64 minute, TimestampTz now)
{
	return counts_empty(&e->pending) && !TransactionIdIsValid(e->inflight_xid) &&
		e->minute != minute && e->tat <= now;
}

/* The lock of the partition a hash value falls in. */
static inline LWLock *
partition_lock(uint32 hashvalue)
{
	return partition_locks[hashvalue % USAGE_PARTITIONS];
}

/* For a pass over the whole table: every partition, always in the same order. */
static void
lock_all(LWLockMode mode)
{
	for (int i = 0; i < USAGE_PARTITIONS; i++)
		LWLockAcquire(partition_locks[i], mode);
}

/* Releases what lock_all() took. */
static void
unlock_all(void)
{
	for (int i = USAGE_PARTITIONS - 1; i >= 0; i--)
		LWLockRelease(partition_locks[i]);
}

/* The key of a key's entry in this database for a day, padding zeroed (compared as bytes). */
static void
usage_key(UsageKey *key, Oid dboid, int32 day, const pg_uuid_t *key_id)
{
	memset(key, 0, sizeof(UsageKey));
	key->dboid = dboid;
	key->day = day;
	memcpy(&key->key_id, key_id, sizeof(pg_uuid_t));
}

/*
 * The fast-index slot of an entry: its partition's bits of the hash, the
 * others mixed with the day, so a key's entries (one hash) fall apart.
 */
static inline uint32
fast_slot(const UsageKey *key, uint32 hashvalue)
{
	uint32		mixed = hashvalue ^ murmurhash32((uint32) key->day);

	return (mixed & fast_mask & ~(uint32) (USAGE_PARTITIONS - 1)) |
		(hashvalue & (USAGE_PARTITIONS - 1));
}

/*
 * Finds an entry: through the fast index when its slot names it, else in
 * the table, and then names it there.  Call with its partition's lock held.
 */
static UsageEntry *
lookup_entry(const UsageKey *key, uint32 hashvalue)
{
	return fast_index_find(usage_table, &fast_slots[fast_slot(key, hashvalue)], key,
						   sizeof(UsageKey), hashvalue);
}

/*
 * Forgets an entry, and its name in the fast index, so that no slot names
 * memory the table may reuse.  Call with its partition's lock held
 * exclusively.
 */
static void
remove_entry(UsageEntry *e)
{
	uint32		hashvalue = get_hash_value(usage_table, &e->key);

	fast_index_remove(usage_table, &fast_slots[fast_slot(&e->key, hashvalue)], e, hashvalue);
}

/*
 * Makes room in a full table by forgetting up to 64 idle entries.  A pass
 * that found none is not repeated in the same minute unless a flush has
 * happened since.  Call with no usage lock held.
 */
static void
evict_idle(int64 minute, TimestampTz now)
{
	HASH_SEQ_STATUS status;
	UsageEntry *e;
	int			evicted = 0;

	SpinLockAcquire(&usage_counters->mutex);
	if (usage_counters->full_scan_minute == minute)
	{
		SpinLockRelease(&usage_counters->mutex);
		return;
	}
	SpinLockRelease(&usage_counters->mutex);

	lock_all(LW_EXCLUSIVE);
	hash_seq_init(&status, usage_table);
	while ((e = hash_seq_search(&status)) != NULL)
	{
		if (entry_idle(e, minute, now))
		{
			remove_entry(e);
			if (++evicted >= 64)
			{
				hash_seq_term(&status);
				break;
			}
		}
	}
	unlock_all();

	if (evicted == 0)
	{
		SpinLockAcquire(&usage_counters->mutex);
		usage_counters->full_scan_minute = minute;
		SpinLockRelease(&usage_counters->mutex);
	}
}

/*
 * The fast-index slots usage_prefetch_slot() fetched for the next count:
 * today's entry's and the rate-limit entry's, or -1.
 */
static int64 prefetched_slot = -1;
static int64 prefetched_rate_slot = -1;

/*
 * Starts fetching the fast-index slot of a key's entry for today (by the
 * statement's clock: a wrong guess at midnight only fetches in vain), and
 * of its rate-limit entry if it has a rate limit, well before
 * usage_count_request() reads them.
 */
void
usage_prefetch_slot(const pg_uuid_t *key_id, bool rate_limited)
{
	UsageKey	key;
	int64		unix_seconds;
	uint32		hashvalue;

	prefetched_slot = -1;
	prefetched_rate_slot = -1;
	if (usage_table == NULL)
		return;
	unix_seconds = GetCurrentStatementStartTimestamp() / USECS_PER_SEC +
		(POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY;
	usage_key(&key, MyDatabaseId, (int32) (unix_seconds / SECS_PER_DAY), key_id);
	/* The day is not hashed: a key's entries share one hash value. */
	hashvalue = get_hash_value(usage_table, &key);
	prefetched_slot = fast_slot(&key, hashvalue);
	prefetch_line(&fast_slots[prefetched_slot]);
	if (rate_limited)
	{
		key.day = RATE_DAY;
		prefetched_rate_slot = fast_slot(&key, hashvalue);
		prefetch_line(&fast_slots[prefetched_rate_slot]);
	}
}

/*
 * Starts fetching the lines of the entries those slots name, those a count
 * reads.  Without a lock: an entry may be gone, and the fetch in vain.
 */
void
usage_prefetch_entry(void)
{
	if (prefetched_rate_slot >= 0)
		fast_index_prefetch(&fast_slots[prefetched_rate_slot], offsetof(UsageEntry, tat),
							offsetof(UsageEntry, tat));
	if (prefetched_slot >= 0)
		fast_index_prefetch(&fast_slots[prefetched_slot],
							offsetof(UsageEntry, pending.last_used_at),
							offsetof(UsageEntry, alerted_minute));
	prefetched_rate_slot = -1;
	prefetched_slot = -1;
}

/*
 * Finds the entry, adding none.  Returns it with its partition's lock held
 * shared (in *lock), or NULL with no lock held.
 */
static UsageEntry *
find_entry(const pg_uuid_t *key_id, int32 day, LWLock **lock)
{
	UsageKey	key;
	uint32		hashvalue;
	UsageEntry *e;

	usage_key(&key, MyDatabaseId, day, key_id);
	hashvalue = get_hash_value(usage_table, &key);
	*lock = partition_lock(hashvalue);

	LWLockAcquire(*lock, LW_SHARED);
	e = lookup_entry(&key, hashvalue);
	if (e == NULL)
		LWLockRelease(*lock);
	return e;
}

/*
 * Finds or adds an entry, without waiting for room: NULL when the table is
 * full.  Call with its partition's lock held exclusively.
 */
static UsageEntry *
enter_entry(const UsageKey *key, uint32 hashvalue)
{
	UsageEntry *e;
	bool		found;

	e = lookup_entry(key, hashvalue);
	/* A shared hash can outgrow its size into spare shared memory: cap it. */
	if (e != NULL || hash_get_num_entries(usage_table) >= max_tracked_keys)
		return e;
	e = hash_search_with_hash_value(usage_table, key, hashvalue, HASH_ENTER_NULL, &found);
	if (e != NULL && !found)
	{
		SpinLockInit(&e->mutex);
		memset(&e->pending, 0, sizeof(UsageCounts));
		memset(&e->inflight, 0, sizeof(UsageCounts));
		e->inflight_xid = InvalidTransactionId;
		memset(&e->settled, 0, sizeof(UsageCounts));
		e->settled_xid = InvalidTransactionId;
		e->minute = 0;
		e->minute_count = 0;
		e->alerted_minute = 0;
		e->tat = 0;
		ItemPointerSetInvalid(&e->row);
		pg_atomic_write_u64(&fast_slots[fast_slot(key, hashvalue)], (uint64) (uintptr_t) e);
	}
	return e;
}

/*
 * Finds or adds a key's entry for a day (*e) and, with rate, its
 * rate-limit entry (*r); either is NULL when there is no room for it (a
 * full table keeps a rate-limit state that still matters, while the day's
 * entry may have been forgotten), and the request then counts as
 * untracked.  Returns false, with no lock held, when both are; else true
 * with their partition's lock held (in *lock; shared when both existed,
 * exclusive when one was just added).
 */
static bool
get_key_entries(const pg_uuid_t *key_id, int32 day, int64 minute, bool rate,
				UsageEntry **e, UsageEntry **r, LWLock **lock)
{
	UsageKey	day_key;
	UsageKey	rate_key;
	uint32		hashvalue;

	usage_key(&day_key, MyDatabaseId, day, key_id);
	if (rate)
		usage_key(&rate_key, MyDatabaseId, RATE_DAY, key_id);
	hashvalue = get_hash_value(usage_table, &day_key);
	*lock = partition_lock(hashvalue);
	*r = NULL;

	LWLockAcquire(*lock, LW_SHARED);
	*e = lookup_entry(&day_key, hashvalue);
	if (rate)
		*r = lookup_entry(&rate_key, hashvalue);
	if (*e != NULL && (!rate || *r != NULL))
		return true;
	LWLockRelease(*lock);

	if (hash_get_num_entries(usage_table) + (rate ? 2 : 1) > max_tracked_keys)
		evict_idle(minute, GetCurrentTimestamp());

	/* The rate-limit state first: with one entry left, limiting matters more than counting. */
	LWLockAcquire(*lock, LW_EXCLUSIVE);
	if (rate)
		*r = enter_entry(&rate_key, hashvalue);
	*e = enter_entry(&day_key, hashvalue);
	if (*e == NULL || (rate && *r == NULL))
	{
		SpinLockAcquire(&usage_counters->mutex);
		usage_counters->untracked++;
		SpinLockRelease(&usage_counters->mutex);
		if (*e == NULL && *r == NULL)
		{
			LWLockRelease(*lock);
			return false;
		}
	}
	return true;
}

/*
 * Finds or adds the entry.  Returns it with its partition's lock held (in
 * *lock; shared when the entry existed, exclusive when it was just added),
 * or NULL with no lock held when there is no room.
 */
static UsageEntry *
get_entry(const pg_uuid_t *key_id, int32 day, int64 minute, LWLock **lock)
{
	UsageEntry *e;
	UsageEntry *unused;

	return get_key_entries(key_id, day, minute, false, &e, &unused, lock) ? e : NULL;
}

/*
 * The generic cell rate algorithm: a key with rate_limit N gets one request
 * every interval = 60 s / N, and may run ahead of that pace by rate_burst
 * requests (tolerance = burst intervals).  So in any 60-second window it
 * passes at most N + burst requests, wherever the window starts.  With
 * take, updates the entry's theoretical arrival time when the request
 * passes; without, changes nothing.  Fills in what is left.  Call with the
 * entry's spinlock held.
 */
static bool
gcra_admit(UsageEntry *e, TimestampTz now, int32 rate_limit, int32 rate_burst, bool take,
		   UsageLimit *limit)
{
	/* Rounded up, so that a window of 60 s never fits one request more. */
	int64		interval = (USECS_PER_MINUTE + rate_limit - 1) / rate_limit;
	int64		burst = rate_burst >= 0 ? rate_burst : (int64) rate_limit - 1;
	int64		tolerance = interval * burst;
	TimestampTz tat;
	int64		ahead;

	/*
	 * No state gets further ahead than a burst just spent; one that is (the
	 * clock was set back) counts as that, not as a debt of the step.
	 */
	tat = Min(Max(e->tat, now), now + tolerance + interval);
	if (take && tat < e->tat)
		e->tat = tat;
	limit->applies = true;
	limit->limit = rate_limit;
	if (tat - now > tolerance)
	{
		limit->remaining = 0;
		limit->reset = tat - tolerance;
		return false;
	}
	if (!take)
	{
		limit->remaining = (int32) Min((tolerance - (tat - now)) / interval + 1, PG_INT32_MAX);
		limit->reset = tat;
		return true;
	}
	e->tat = tat + interval;
	ahead = e->tat - now;
	limit->remaining = ahead > tolerance ? 0 : (int32) Min((tolerance - ahead) / interval + 1, PG_INT32_MAX);
	limit->reset = limit->remaining == 0 ? e->tat - tolerance : e->tat;
	return true;
}

/*
 * Takes back a request gcra_admit() let pass (and left the entry at
 * admitted_tat), unless another request passed since: taking an interval
 * off that one's state could let one request more through.  Call with the
 * entry's spinlock held.
 */
static void
gcra_undo(UsageEntry *e, int32 rate_limit, TimestampTz admitted_tat)
{
	if (e->tat == admitted_tat)
		e->tat -= (USECS_PER_MINUTE + rate_limit - 1) / rate_limit;
}

/*
 * The owner-wide limit: one GCRA state per owner and database, kept in the
 * table under the owner's id and day OWNER_DAY (no key has that day), with
 * a minute's requests of burst.  Returns whether the request passes (with
 * take, taking it; without, only looking).
 */
static bool
owner_admit(const pg_uuid_t *owner_id, int32 rate_limit, TimestampTz now, int64 minute,
			bool take, UsageLimit *limit)
{
	LWLock	   *lock;
	UsageEntry *e = take ? get_entry(owner_id, OWNER_DAY, minute, &lock)
		: find_entry(owner_id, OWNER_DAY, &lock);
	bool		admitted;

	/* No room (or, to look, no state): like an untracked key, not limited. */
	if (e == NULL)
		return true;
	SpinLockAcquire(&e->mutex);
	admitted = gcra_admit(e, now, rate_limit, -1, take, limit);
	SpinLockRelease(&e->mutex);
	LWLockRelease(lock);
	return admitted;
}

/*
 * The limit to report: the one that refused, else the one with fewer
 * requests left; with none left in either, the one that passes the next
 * request later, so that its reset is when the next request will pass.
 */
static void
tighter_limit(UsageLimit *limit, const UsageLimit *key, bool key_ok,
			  const UsageLimit *owner, bool owner_ok)
{
	if (!key_ok || !owner->applies)
		*limit = *key;
	else if (!owner_ok || !key->applies || owner->remaining < key->remaining ||
			 (owner->remaining == 0 && key->remaining == 0 && owner->reset > key->reset))
		*limit = *owner;
	else
		*limit = *key;
}

/*
 * Counts a request in its key's entry for the day: a use, or (refused by a
 * rate limit) a failure; and whether it crossed the alert threshold.  Call
 * with the entry's partition lock held.
 */
static UsageOutcome
count_request(UsageEntry *e, bool allowed, TimestampTz now, int64 minute, int32 alert_threshold,
			  int64 *alert_requests)
{
	/* A standby enforces rate limits but keeps no counts: nothing could write them. */
	bool		standby = RecoveryInProgress();
	UsageOutcome outcome = allowed ? USAGE_ALLOWED : USAGE_RATE_LIMITED;

	SpinLockAcquire(&e->mutex);
	if (e->minute != minute)
	{
		e->minute = minute;
		e->minute_count = 0;
	}
	if (!allowed)
	{
		if (!standby)
			e->pending.failures++;
	}
	else
	{
		e->minute_count++;
		if (!standby)
		{
			e->pending.requests++;
			e->pending.last_used_at = now;
		}
		if (alert_threshold > 0 && !standby &&
			e->minute_count > alert_threshold &&
			e->alerted_minute != minute)
		{
			e->alerted_minute = minute;
			*alert_requests = e->minute_count;
		}
	}
	SpinLockRelease(&e->mutex);
	return outcome;
}

/*
 * The owner-limited request's usual case: the key's day entry, its
 * rate-limit entry (with rate) and the owner's state all exist.  Their two
 * partitions are locked (shared) in ascending order, as lock_all() takes
 * them, so holding both cannot deadlock; then the key's limit and the
 * owner's are applied as one step, with no partition let go in between.
 * Returns false, changing nothing and holding no lock, when an entry is
 * missing: the caller's general path adds it.
 */
static bool
count_owner_request(const pg_uuid_t *key_id, int32 rate_limit, int32 rate_burst,
					const pg_uuid_t *owner_id, int32 owner_rate_limit, TimestampTz now,
					int64 minute, int32 day, int32 alert_threshold, int64 *alert_requests,
					UsageLimit *limit, UsageOutcome *outcome)
{
	UsageKey	day_key;
	UsageKey	rate_key;
	UsageKey	owner_key;
	uint32		hashvalue;
	uint32		owner_hashvalue;
	LWLock	   *lock;
	LWLock	   *owner_lock;
	UsageEntry *e;
	UsageEntry *r = NULL;
	UsageEntry *o;
	bool		key_ok = true;
	bool		owner_ok = true;
	bool		owner_would_pass = true;
	TimestampTz admitted_tat = 0;
	UsageLimit	key_limit = {false, 0, 0, 0};
	UsageLimit	owner_limit = {false, 0, 0, 0};
	UsageLimit	owner_look = {false, 0, 0, 0};

	usage_key(&day_key, MyDatabaseId, day, key_id);
	usage_key(&rate_key, MyDatabaseId, RATE_DAY, key_id);
	usage_key(&owner_key, MyDatabaseId, OWNER_DAY, owner_id);
	hashvalue = get_hash_value(usage_table, &day_key);
	owner_hashvalue = get_hash_value(usage_table, &owner_key);
	lock = partition_lock(hashvalue);
	owner_lock = partition_lock(owner_hashvalue);
	if (hashvalue % USAGE_PARTITIONS <= owner_hashvalue % USAGE_PARTITIONS)
	{
		LWLockAcquire(lock, LW_SHARED);
		if (owner_lock != lock)
			LWLockAcquire(owner_lock, LW_SHARED);
	}
	else
	{
		LWLockAcquire(owner_lock, LW_SHARED);
		LWLockAcquire(lock, LW_SHARED);
	}
	e = lookup_entry(&day_key, hashvalue);
	if (rate_limit > 0)
		r = lookup_entry(&rate_key, hashvalue);
	o = lookup_entry(&owner_key, owner_hashvalue);
	if (e == NULL || (rate_limit > 0 && r == NULL) || o == NULL)
	{
		if (owner_lock != lock)
			LWLockRelease(owner_lock);
		LWLockRelease(lock);
		return false;
	}

	if (r != NULL)
	{
		SpinLockAcquire(&r->mutex);
		key_ok = gcra_admit(r, now, rate_limit, rate_burst, true, &key_limit);
		admitted_tat = r->tat;
		SpinLockRelease(&r->mutex);
	}
	SpinLockAcquire(&o->mutex);
	if (key_ok)
		owner_ok = gcra_admit(o, now, owner_rate_limit, -1, true, &owner_limit);
	else
		owner_would_pass = gcra_admit(o, now, owner_rate_limit, -1, false, &owner_look);
	SpinLockRelease(&o->mutex);
	/* The owner refused what the key let pass: the key's step is taken back. */
	if (!owner_ok && r != NULL)
	{
		SpinLockAcquire(&r->mutex);
		gcra_undo(r, rate_limit, admitted_tat);
		SpinLockRelease(&r->mutex);
	}
	tighter_limit(limit, &key_limit, key_ok, &owner_limit, owner_ok);
	*outcome = count_request(e, key_ok && owner_ok, now, minute, alert_threshold, alert_requests);
	if (owner_lock != lock)
		LWLockRelease(owner_lock);
	LWLockRelease(lock);

	/* The key refused; the owner's limit may hold the next request longer. */
	if (!key_ok && !owner_would_pass && owner_look.reset > limit->reset)
		*limit = owner_look;
	return true;
}

/* Counts a verification that would pass, enforcing the key's and its owner's rate limits. */
UsageOutcome
usage_count_request(const pg_uuid_t *key_id, int32 rate_limit, int32 rate_burst,
					const pg_uuid_t *owner_id, int32 owner_rate_limit,
					int32 *alert_threshold, int64 *alert_requests, UsageLimit *limit)
{
	TimestampTz now;
	int64		minute;
	int32		day;
	UsageEntry *e;
	UsageEntry *r;
	LWLock	   *lock;
	UsageOutcome outcome;
	bool		key_ok = true;
	bool		owner_ok = true;
	TimestampTz admitted_tat = 0;
	UsageLimit	key_limit = {false, 0, 0, 0};
	UsageLimit	owner_limit = {false, 0, 0, 0};

	*alert_requests = 0;
	limit->applies = false;
	if (usage_table == NULL)
		return USAGE_UNTRACKED;
	if (*alert_threshold < 0)
		*alert_threshold = alert_requests_per_minute;

	/*
	 * The key's rate-limit state is an entry of its own, whatever the day:
	 * midnight neither hands out a fresh burst nor splits the state between
	 * two days' entries.  No room for it: the key is not limited, like an
	 * untracked one; no room for the day's entry: the request is not counted.
	 */
	now_parts(&now, &minute, &day);
	if (owner_rate_limit > 0 &&
		count_owner_request(key_id, rate_limit, rate_burst, owner_id, owner_rate_limit, now,
							minute, day, *alert_threshold, alert_requests, limit, &outcome))
		return outcome;
	if (!get_key_entries(key_id, day, minute, rate_limit > 0, &e, &r, &lock))
		return USAGE_UNTRACKED;
	if (r != NULL)
	{
		SpinLockAcquire(&r->mutex);
		key_ok = gcra_admit(r, now, rate_limit, rate_burst, true, &key_limit);
		admitted_tat = r->tat;
		SpinLockRelease(&r->mutex);
	}
	if (key_ok && owner_rate_limit > 0)
	{
		/*
		 * An entry was missing (see count_owner_request()).  Adding the
		 * owner's may take its partition exclusively, or every partition to
		 * make room (evict_idle()), which needs no usage lock held: this one
		 * is let go first.  The key's entries, used now, are not idle, so
		 * they are found again.
		 */
		LWLockRelease(lock);
		owner_ok = owner_admit(owner_id, owner_rate_limit, now, minute, true, &owner_limit);
		if (!get_key_entries(key_id, day, minute, !owner_ok && r != NULL, &e, &r, &lock))
		{
			tighter_limit(limit, &key_limit, key_ok, &owner_limit, owner_ok);
			return owner_ok ? USAGE_UNTRACKED : USAGE_RATE_LIMITED;
		}
		if (r != NULL)
		{
			SpinLockAcquire(&r->mutex);
			gcra_undo(r, rate_limit, admitted_tat);
			SpinLockRelease(&r->mutex);
		}
	}
	tighter_limit(limit, &key_limit, key_ok, &owner_limit, owner_ok);

	if (e != NULL)
		outcome = count_request(e, key_ok && owner_ok, now, minute, *alert_threshold,
								alert_requests);
	else
		outcome = key_ok && owner_ok ? USAGE_UNTRACKED : USAGE_RATE_LIMITED;
	LWLockRelease(lock);

	/*
	 * The key refused without asking its owner's limit, which may hold the
	 * next request longer: then that is when it will pass.
	 */
	if (!key_ok && owner_rate_limit > 0 &&
		!owner_admit(owner_id, owner_rate_limit, now, minute, false, &owner_limit) &&
		owner_limit.reset > limit->reset)
		*limit = owner_limit;
	return outcome;
}

/* Counts a refusal of a key that exists (revoked, expired, scope). */
void
usage_count_failure(const pg_uuid_t *key_id)
{
	TimestampTz now;
	int64		minute;
	int32		day;
	UsageEntry *e;
	LWLock	   *lock;

	if (usage_table == NULL || RecoveryInProgress())
		return;
	now_parts(&now, &minute, &day);
	e = get_entry(key_id, day, minute, &lock);
	if (e == NULL)
		return;
	SpinLockAcquire(&e->mutex);
	e->pending.failures++;
	SpinLockRelease(&e->mutex);
	LWLockRelease(lock);
}

/* The snapshot a reader's statement sees. */
static Snapshot
snapshot_for_reading(void)
{
	return ActiveSnapshotSet() ? GetActiveSnapshot() : GetTransactionSnapshot();
}

/* Today's counts of a key not yet in apikeys.key_usage as the caller's snapshot sees it. */
static void
usage_pending(const pg_uuid_t *key_id, UsageCounts *counts)
{
	UsageKey	key;
	uint32		hashvalue;
	LWLock	   *lock;
	UsageEntry *e;
	TimestampTz now;
	int64		minute;
	int32		day;

	memset(counts, 0, sizeof(UsageCounts));
	if (usage_table == NULL)
		return;

	now_parts(&now, &minute, &day);
	usage_key(&key, MyDatabaseId, day, key_id);
	hashvalue = get_hash_value(usage_table, &key);
	lock = partition_lock(hashvalue);
	LWLockAcquire(lock, LW_SHARED);
	e = lookup_entry(&key, hashvalue);
	if (e != NULL)
	{
		Snapshot	snapshot = snapshot_for_reading();
		TransactionId xid;
		UsageCounts inflight;
		TransactionId settled_xid;
		UsageCounts settled;

		SpinLockAcquire(&e->mutex);
		*counts = e->pending;
		xid = e->inflight_xid;
		inflight = e->inflight;
		settled_xid = e->settled_xid;
		settled = e->settled;
		SpinLockRelease(&e->mutex);

		/*
		 * Counts a flush has taken are in apikeys.key_usage only if its
		 * transaction committed and our snapshot sees it; otherwise they are
		 * still ours to add, so totals stay exact across a flush.  That holds
		 * for the last flush settled too: it may have committed and settled
		 * after our snapshot was taken (read before the row it wrote).
		 */
		if (TransactionIdIsValid(xid) &&
			!(TransactionIdDidCommit(xid) && !XidInMVCCSnapshot(xid, snapshot)))
			counts_add(counts, &inflight);
		if (TransactionIdIsValid(settled_xid) && XidInMVCCSnapshot(settled_xid, snapshot))
			counts_add(counts, &settled);
	}
	LWLockRelease(lock);
}

/*
 * Settles what an earlier flush took: in the table if its transaction
 * committed (and kept as the last settled flush, for readers whose
 * snapshot does not see that commit), pending again if not.  Caller holds
 * the entry's spinlock.
 */
static void
settle_inflight(UsageEntry *e, bool committed)
{
	if (committed)
	{
		e->settled = e->inflight;
		e->settled_xid = e->inflight_xid;
	}
	else
		counts_add(&e->pending, &e->inflight);
	memset(&e->inflight, 0, sizeof(UsageCounts));
	e->inflight_xid = InvalidTransactionId;
}

/*
 * Moves the entry's pending counts in flight for the flush transaction xid,
 * and describes them in *delta.  Caller holds the entry's spinlock.
 */
static void
take_counts(UsageEntry *e, TransactionId xid, UsageDelta *delta)
{
	delta->entry = e;
	memcpy(&delta->key_id, &e->key.key_id, sizeof(pg_uuid_t));
	delta->day = e->key.day;
	delta->counts = e->pending;
	delta->row = e->row;
	e->inflight = e->pending;
	e->inflight_xid = xid;
	memset(&e->pending, 0, sizeof(UsageCounts));
}

/* Forgets entries found idle by a pass, unless used since. */
static void
forget_idle(const UsageKey *keys, int n, int64 minute)
{
	for (int i = 0; i < n; i++)
	{
		uint32		hashvalue = get_hash_value(usage_table, &keys[i]);
		LWLock	   *lock = partition_lock(hashvalue);
		UsageEntry *e;

		LWLockAcquire(lock, LW_EXCLUSIVE);
		e = lookup_entry(&keys[i], hashvalue);
		if (e != NULL && entry_idle(e, minute, GetCurrentTimestamp()))
			remove_entry(e);
		LWLockRelease(lock);
	}
}

/* Takes a database's pending counts for a flush transaction, forgetting idle keys. */
int
usage_take_pending(Oid dboid, TransactionId xid, UsageDelta **result)
{
	UsageDelta *out;
	UsageKey   *idle;
	int			idle_max = 64;
	int			n_idle = 0;
	bool		nearly_full;
	HASH_SEQ_STATUS status;
	UsageEntry *e;
	TimestampTz now;
	int64		minute;
	int32		day;
	int			n = 0;

	*result = NULL;
	if (usage_table == NULL)
		return 0;
	now_parts(&now, &minute, &day);
	idle = palloc(sizeof(UsageKey) * idle_max);

	/*
	 * Shared locks: verify keeps counting (under each entry's spinlock) while
	 * this pass runs; only adding or removing entries waits.
	 */
	lock_all(LW_SHARED);
	/* No entry comes or goes while every partition is locked. */
	out = palloc(sizeof(UsageDelta) * Max(hash_get_num_entries(usage_table), 1));
	nearly_full = hash_get_num_entries(usage_table) >= max_tracked_keys / 10 * 9;
	hash_seq_init(&status, usage_table);
	while ((e = hash_seq_search(&status)) != NULL)
	{
		TransactionId earlier;
		bool		committed = false;
		bool		forget;

		if (e->key.dboid != dboid)
			continue;
		/* Only this database's worker writes the in-flight fields. */
		earlier = e->inflight_xid;
		if (TransactionIdIsValid(earlier))
			committed = TransactionIdDidCommit(earlier);

		SpinLockAcquire(&e->mutex);
		if (TransactionIdIsValid(earlier))
			settle_inflight(e, committed);

		/*
		 * Forget idle entries of past days, and of today only when the table
		 * is nearly full: a key used again today then finds its entry under
		 * a shared lock instead of adding it again.
		 */
		forget = entry_idle(e, minute, now) && (e->key.day != day || nearly_full);
		if (!forget && !counts_empty(&e->pending))
			take_counts(e, xid, &out[n++]);
		SpinLockRelease(&e->mutex);

		if (forget)
		{
			if (n_idle == idle_max)
			{
				idle_max *= 2;
				idle = repalloc(idle, sizeof(UsageKey) * idle_max);
			}
			idle[n_idle++] = e->key;
		}
	}
	unlock_all();

	forget_idle(idle, n_idle, minute);
	pfree(idle);
	*result = out;
	return n;
}

/*
 * No lookup: an entry with counts in flight is never idle, so nothing
 * removes it (or reuses its memory) before this clears them.  Every
 * partition is held in shared mode meanwhile: evict_idle(), which holds them
 * exclusively, must not see an entry go idle before its spinlock is free.
 */
void
usage_flush_done(TransactionId xid, const UsageDelta *deltas, int n)
{
	lock_all(LW_SHARED);
	for (int i = 0; i < n; i++)
	{
		UsageEntry *e = deltas[i].entry;

		SpinLockAcquire(&e->mutex);
		if (e->inflight_xid == xid)
		{
			settle_inflight(e, true);
			e->row = deltas[i].row;
		}
		SpinLockRelease(&e->mutex);
	}
	unlock_all();

	/* Entries just written may be idle now: a full table can look again. */
	SpinLockAcquire(&usage_counters->mutex);
	usage_counters->full_scan_minute = 0;
	SpinLockRelease(&usage_counters->mutex);
}

/* Forgets every count of a database that is gone. */
void
usage_discard(Oid dboid)
{
	HASH_SEQ_STATUS status;
	UsageEntry *e;

	lock_all(LW_EXCLUSIVE);
	hash_seq_init(&status, usage_table);
	while ((e = hash_seq_search(&status)) != NULL)
		if (e->key.dboid == dboid)
			remove_entry(e);
	unlock_all();
}

/* Whether an entry has counts a flush must still write or settle. */
static bool
entry_has_work(UsageEntry *e)
{
	bool		has;

	SpinLockAcquire(&e->mutex);
	has = !counts_empty(&e->pending) || TransactionIdIsValid(e->inflight_xid);
	SpinLockRelease(&e->mutex);
	return has;
}

/* Adds the databases that have counts to write to a list of OIDs. */
List *
usage_databases_with_counts(List *dboids)
{
	HASH_SEQ_STATUS status;
	UsageEntry *e;

	lock_all(LW_SHARED);
	hash_seq_init(&status, usage_table);
	while ((e = hash_seq_search(&status)) != NULL)
		if (entry_has_work(e))
			dboids = list_append_unique_oid(dboids, e->key.dboid);
	unlock_all();
	return dboids;
}

/* Whether the database has counts waiting to be written. */
bool
usage_has_pending(Oid dboid)
{
	HASH_SEQ_STATUS status;
	UsageEntry *e;
	bool		pending = false;

	lock_all(LW_SHARED);
	hash_seq_init(&status, usage_table);
	while ((e = hash_seq_search(&status)) != NULL)
	{
		if (e->key.dboid == dboid && entry_has_work(e))
		{
			pending = true;
			hash_seq_term(&status);
			break;
		}
	}
	unlock_all();
	return pending;
}

/* Keys tracked now, and requests that could not be tracked since start. */
void
usage_stats(int64 *tracked, int64 *untracked)
{
	*tracked = 0;
	*untracked = 0;
	if (usage_table == NULL)
		return;
	lock_all(LW_SHARED);
	*tracked = hash_get_num_entries(usage_table);
	unlock_all();
	SpinLockAcquire(&usage_counters->mutex);
	*untracked = usage_counters->untracked;
	SpinLockRelease(&usage_counters->mutex);
}

PG_FUNCTION_INFO_V1(apikeys_pending_usage);

/*
 * _pending_usage(key_id): today's counts still in shared memory, so
 * list_keys() can add them to what the worker has written.
 */
Datum
apikeys_pending_usage(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[3];
	bool		nulls[3] = {false, false, false};
	UsageCounts counts;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	usage_pending(PG_GETARG_UUID_P(0), &counts);
	values[0] = Int64GetDatum(counts.requests);
	values[1] = Int64GetDatum(counts.failures);
	values[2] = TimestampTzGetDatum(counts.last_used_at);
	nulls[2] = counts.last_used_at == 0;
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

PG_FUNCTION_INFO_V1(apikeys_rate_carry);

/*
 * _rate_carry(from_key, to_key): gives to_key from_key's rate-limit state,
 * unless its own is further ahead, so that rotate's new key takes over the
 * allowance spent so far.  Nothing without the preload, or when from_key's
 * whole allowance is back.
 */
Datum
apikeys_rate_carry(PG_FUNCTION_ARGS)
{
	UsageKey	key;
	uint32		hashvalue;
	LWLock	   *lock;
	UsageEntry *e;
	TimestampTz tat;

	if (usage_table == NULL)
		PG_RETURN_VOID();
	e = find_entry(PG_GETARG_UUID_P(0), RATE_DAY, &lock);
	if (e == NULL)
		PG_RETURN_VOID();
	SpinLockAcquire(&e->mutex);
	tat = e->tat;
	SpinLockRelease(&e->mutex);
	LWLockRelease(lock);

	if (tat <= GetCurrentTimestamp())
		PG_RETURN_VOID();
	/* No room: the new key starts afresh (no verification went untracked). */
	usage_key(&key, MyDatabaseId, RATE_DAY, PG_GETARG_UUID_P(1));
	hashvalue = get_hash_value(usage_table, &key);
	lock = partition_lock(hashvalue);
	LWLockAcquire(lock, LW_EXCLUSIVE);
	e = enter_entry(&key, hashvalue);
	if (e != NULL)
	{
		SpinLockAcquire(&e->mutex);
		e->tat = Max(e->tat, tat);
		SpinLockRelease(&e->mutex);
	}
	LWLockRelease(lock);
	PG_RETURN_VOID();
}
