/*
 * usage.c — per-key, per-UTC-day counters in a shared hash.
 *
 * The table is split in APIKEYS_USAGE_PARTITIONS by hash, each with its own
 * lock, so backends rarely meet.  The hot path takes its partition's lock in
 * shared mode and the entry's spinlock; only a key's first request of the
 * day takes the partition exclusively, to add its entry.  When the table is
 * full, idle entries (nothing pending, not used this minute) make room; if
 * none is idle the request is untracked: it verifies as usual but is neither
 * counted nor rate limited, and status() counts it.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/transam.h"
#include "access/xlog.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/hsearch.h"
#include "utils/snapmgr.h"

#include "shmem.h"
#include "usage.h"

int			apikeys_max_tracked_keys = 100000;
int			apikeys_alert_requests_per_minute = 0;

typedef struct UsageKey
{
	Oid			dboid;
	int32		day;
	pg_uuid_t	key_id;
} UsageKey;

typedef struct UsageEntry
{
	UsageKey	key;
	slock_t		mutex;
	bool		row_exists;		/* a committed flush wrote this key's row for the day */
	int64		requests;		/* pending: not yet written */
	int64		failures;		/* pending */
	TimestampTz last_used_at;	/* pending, 0 if none */
	/* Taken by a flush whose transaction may not have committed yet. */
	int64		inflight_requests;
	int64		inflight_failures;
	TimestampTz inflight_last_used_at;
	TransactionId inflight_xid;
	int64		minute;			/* the minute minute_count belongs to */
	int64		minute_count;	/* requests allowed in that minute */
	int64		alerted_minute;
} UsageEntry;

typedef struct UsageCounters
{
	slock_t		mutex;
	int64		untracked;
	int64		full_scan_minute;	/* under mutex */
} UsageCounters;

static HTAB *usage_table = NULL;
static UsageCounters *usage_counters = NULL;

Size
usage_shmem_size(void)
{
	return add_size(MAXALIGN(sizeof(UsageCounters)),
					hash_estimate_size(apikeys_max_tracked_keys, sizeof(UsageEntry)));
}

void
usage_shmem_init(void)
{
	HASHCTL		info;
	bool		found;

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
	info.num_partitions = APIKEYS_USAGE_PARTITIONS;
	usage_table = ShmemInitHash("apikeys usage", apikeys_max_tracked_keys,
								apikeys_max_tracked_keys, &info,
								HASH_ELEM | HASH_BLOBS | HASH_PARTITION);
}

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

static inline bool
has_inflight(UsageEntry *e)
{
	return TransactionIdIsValid(e->inflight_xid);
}

static inline bool
entry_idle(UsageEntry *e, int64 minute)
{
	return e->requests == 0 && e->failures == 0 && !has_inflight(e) && e->minute != minute;
}

static inline LWLock *
partition_lock(uint32 hashvalue)
{
	return apikeys_shared->usage_locks[hashvalue % APIKEYS_USAGE_PARTITIONS];
}

/* For a pass over the whole table: every partition, always in the same order. */
static void
lock_all(LWLockMode mode)
{
	for (int i = 0; i < APIKEYS_USAGE_PARTITIONS; i++)
		LWLockAcquire(apikeys_shared->usage_locks[i], mode);
}

static void
unlock_all(void)
{
	for (int i = APIKEYS_USAGE_PARTITIONS - 1; i >= 0; i--)
		LWLockRelease(apikeys_shared->usage_locks[i]);
}

/*
 * Makes room in a full table by forgetting up to 64 idle entries.  A pass
 * that found none is not repeated in the same minute unless a flush has
 * happened since.  Call with no usage lock held.
 */
static void
evict_idle(int64 minute)
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
		if (entry_idle(e, minute))
		{
			hash_search(usage_table, &e->key, HASH_REMOVE, NULL);
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
 * Finds or adds the entry.  Returns it with its partition's lock held (in
 * *lock; shared when the entry existed, exclusive when it was just added),
 * or NULL with no lock held when there is no room.
 */
static UsageEntry *
get_entry(const pg_uuid_t *key_id, int32 day, int64 minute, LWLock **lock)
{
	UsageKey	key;
	uint32		hashvalue;
	UsageEntry *e;
	bool		found;

	memset(&key, 0, sizeof(key));	/* compared as bytes */
	key.dboid = MyDatabaseId;
	key.day = day;
	memcpy(&key.key_id, key_id, sizeof(pg_uuid_t));
	hashvalue = get_hash_value(usage_table, &key);
	*lock = partition_lock(hashvalue);

	LWLockAcquire(*lock, LW_SHARED);
	e = hash_search_with_hash_value(usage_table, &key, hashvalue, HASH_FIND, NULL);
	if (e != NULL)
		return e;
	LWLockRelease(*lock);

	if (hash_get_num_entries(usage_table) >= apikeys_max_tracked_keys)
		evict_idle(minute);

	LWLockAcquire(*lock, LW_EXCLUSIVE);
	e = hash_search_with_hash_value(usage_table, &key, hashvalue, HASH_FIND, NULL);
	if (e != NULL)
		return e;
	/* A shared hash can outgrow its size into spare shared memory: cap it. */
	if (hash_get_num_entries(usage_table) < apikeys_max_tracked_keys)
	{
		e = hash_search_with_hash_value(usage_table, &key, hashvalue, HASH_ENTER_NULL, &found);
		if (e != NULL && !found)
		{
			SpinLockInit(&e->mutex);
			e->requests = 0;
			e->failures = 0;
			e->last_used_at = 0;
			e->inflight_requests = 0;
			e->inflight_failures = 0;
			e->inflight_last_used_at = 0;
			e->inflight_xid = InvalidTransactionId;
			e->minute = 0;
			e->minute_count = 0;
			e->alerted_minute = 0;
			e->row_exists = false;
		}
	}
	if (e == NULL)
	{
		LWLockRelease(*lock);
		SpinLockAcquire(&usage_counters->mutex);
		usage_counters->untracked++;
		SpinLockRelease(&usage_counters->mutex);
	}
	return e;
}

UsageOutcome
usage_count_request(const pg_uuid_t *key_id, int32 rate_limit, int64 *alert_requests)
{
	TimestampTz now;
	int64		minute;
	int32		day;
	UsageEntry *e;
	LWLock	   *lock;
	UsageOutcome outcome;
	bool		standby;

	*alert_requests = 0;
	if (apikeys_shared == NULL)
		return USAGE_UNTRACKED;

	now_parts(&now, &minute, &day);
	e = get_entry(key_id, day, minute, &lock);
	if (e == NULL)
		return USAGE_UNTRACKED;

	/* A standby enforces rate limits but keeps no counts: nothing could write them. */
	standby = RecoveryInProgress();
	SpinLockAcquire(&e->mutex);
	if (e->minute != minute)
	{
		e->minute = minute;
		e->minute_count = 0;
	}
	if (rate_limit > 0 && e->minute_count >= rate_limit)
	{
		if (!standby)
			e->failures++;
		outcome = USAGE_RATE_LIMITED;
	}
	else
	{
		e->minute_count++;
		if (!standby)
		{
			e->requests++;
			e->last_used_at = now;
		}
		outcome = USAGE_ALLOWED;
		if (apikeys_alert_requests_per_minute > 0 && !standby &&
			e->minute_count > apikeys_alert_requests_per_minute &&
			e->alerted_minute != minute)
		{
			e->alerted_minute = minute;
			*alert_requests = e->minute_count;
		}
	}
	SpinLockRelease(&e->mutex);
	LWLockRelease(lock);
	return outcome;
}

void
usage_count_failure(const pg_uuid_t *key_id)
{
	TimestampTz now;
	int64		minute;
	int32		day;
	UsageEntry *e;
	LWLock	   *lock;

	if (apikeys_shared == NULL || RecoveryInProgress())
		return;
	now_parts(&now, &minute, &day);
	e = get_entry(key_id, day, minute, &lock);
	if (e == NULL)
		return;
	SpinLockAcquire(&e->mutex);
	e->failures++;
	SpinLockRelease(&e->mutex);
	LWLockRelease(lock);
}

static Snapshot
snapshot_for_reading(void)
{
	return ActiveSnapshotSet() ? GetActiveSnapshot() : GetTransactionSnapshot();
}

void
usage_pending(const pg_uuid_t *key_id, int64 *requests, int64 *failures,
			  TimestampTz *last_used_at)
{
	UsageKey	key;
	uint32		hashvalue;
	LWLock	   *lock;
	UsageEntry *e;
	TimestampTz now;
	int64		minute;

	*requests = 0;
	*failures = 0;
	*last_used_at = 0;
	if (apikeys_shared == NULL)
		return;

	memset(&key, 0, sizeof(key));
	key.dboid = MyDatabaseId;
	now_parts(&now, &minute, &key.day);
	memcpy(&key.key_id, key_id, sizeof(pg_uuid_t));

	hashvalue = get_hash_value(usage_table, &key);
	lock = partition_lock(hashvalue);
	LWLockAcquire(lock, LW_SHARED);
	e = hash_search_with_hash_value(usage_table, &key, hashvalue, HASH_FIND, NULL);
	if (e != NULL)
	{
		TransactionId xid;
		int64		inflight_requests;
		int64		inflight_failures;
		TimestampTz inflight_last_used_at;

		SpinLockAcquire(&e->mutex);
		*requests = e->requests;
		*failures = e->failures;
		*last_used_at = e->last_used_at;
		xid = e->inflight_xid;
		inflight_requests = e->inflight_requests;
		inflight_failures = e->inflight_failures;
		inflight_last_used_at = e->inflight_last_used_at;
		SpinLockRelease(&e->mutex);

		/*
		 * Counts a flush has taken are in apikeys.key_usage only if its
		 * transaction committed and our snapshot sees it; otherwise they are
		 * still ours to add, so totals stay exact across a flush.
		 */
		if (TransactionIdIsValid(xid) &&
			!(TransactionIdDidCommit(xid) && !XidInMVCCSnapshot(xid, snapshot_for_reading())))
		{
			*requests += inflight_requests;
			*failures += inflight_failures;
			*last_used_at = Max(*last_used_at, inflight_last_used_at);
		}
	}
	LWLockRelease(lock);
}

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
	if (apikeys_shared == NULL)
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
	nearly_full = hash_get_num_entries(usage_table) >= apikeys_max_tracked_keys / 10 * 9;
	hash_seq_init(&status, usage_table);
	while ((e = hash_seq_search(&status)) != NULL)
	{
		TransactionId earlier;
		bool		earlier_committed = false;
		bool		forget;

		if (e->key.dboid != dboid)
			continue;
		/* Only this database's worker writes the inflight fields. */
		earlier = e->inflight_xid;
		if (TransactionIdIsValid(earlier))
			earlier_committed = TransactionIdDidCommit(earlier);

		SpinLockAcquire(&e->mutex);
		if (TransactionIdIsValid(earlier))
		{
			/* Counts an earlier flush took but never committed are written again. */
			if (earlier_committed)
				e->row_exists = true;
			else
			{
				e->requests += e->inflight_requests;
				e->failures += e->inflight_failures;
				e->last_used_at = Max(e->last_used_at, e->inflight_last_used_at);
			}
			e->inflight_requests = 0;
			e->inflight_failures = 0;
			e->inflight_last_used_at = 0;
			e->inflight_xid = InvalidTransactionId;
		}

		/*
		 * Forget idle entries of past days, and of today only when the table
		 * is nearly full: a key used again today then finds its entry under
		 * a shared lock instead of adding it again.
		 */
		forget = entry_idle(e, minute) && (e->key.day != day || nearly_full);
		if (!forget && (e->requests != 0 || e->failures != 0))
		{
			out[n].entry = e;
			memcpy(&out[n].key_id, &e->key.key_id, sizeof(pg_uuid_t));
			out[n].day = e->key.day;
			out[n].requests = e->requests;
			out[n].failures = e->failures;
			out[n].last_used_at = e->last_used_at;
			out[n].row_exists = e->row_exists;
			e->inflight_requests = e->requests;
			e->inflight_failures = e->failures;
			e->inflight_last_used_at = e->last_used_at;
			e->inflight_xid = xid;
			e->requests = 0;
			e->failures = 0;
			e->last_used_at = 0;
			n++;
		}
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

	/* A key used since the pass above stays. */
	for (int i = 0; i < n_idle; i++)
	{
		uint32		hashvalue = get_hash_value(usage_table, &idle[i]);
		LWLock	   *lock = partition_lock(hashvalue);

		LWLockAcquire(lock, LW_EXCLUSIVE);
		e = hash_search_with_hash_value(usage_table, &idle[i], hashvalue, HASH_FIND, NULL);
		if (e != NULL && entry_idle(e, minute))
			hash_search_with_hash_value(usage_table, &idle[i], hashvalue, HASH_REMOVE, NULL);
		LWLockRelease(lock);
	}
	pfree(idle);
	*result = out;
	return n;
}

/*
 * No lookup: an entry with counts in flight is never idle, so nothing
 * removes it (or reuses its memory) before this clears them.
 */
void
usage_flush_done(TransactionId xid, const UsageDelta *deltas, int n)
{
	for (int i = 0; i < n; i++)
	{
		UsageEntry *e = deltas[i].entry;

		SpinLockAcquire(&e->mutex);
		if (e->inflight_xid == xid)
		{
			e->row_exists = true;
			e->inflight_requests = 0;
			e->inflight_failures = 0;
			e->inflight_last_used_at = 0;
			e->inflight_xid = InvalidTransactionId;
		}
		SpinLockRelease(&e->mutex);
	}

	/* Entries just written may be idle now: a full table can look again. */
	SpinLockAcquire(&usage_counters->mutex);
	usage_counters->full_scan_minute = 0;
	SpinLockRelease(&usage_counters->mutex);
}

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
		bool		has;

		if (e->key.dboid != dboid)
			continue;
		SpinLockAcquire(&e->mutex);
		has = e->requests != 0 || e->failures != 0 || has_inflight(e);
		SpinLockRelease(&e->mutex);
		if (has)
		{
			pending = true;
			hash_seq_term(&status);
			break;
		}
	}
	unlock_all();
	return pending;
}

void
usage_stats(int64 *tracked, int64 *untracked)
{
	*tracked = 0;
	*untracked = 0;
	if (apikeys_shared == NULL)
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
	int64		requests;
	int64		failures;
	TimestampTz last_used_at;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	usage_pending(PG_GETARG_UUID_P(0), &requests, &failures, &last_used_at);
	values[0] = Int64GetDatum(requests);
	values[1] = Int64GetDatum(failures);
	values[2] = TimestampTzGetDatum(last_used_at);
	nulls[2] = last_used_at == 0;
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}
