/*
 * credits.c — keys' credit balances in a shared hash.
 *
 * Once loaded from apikeys.keys, a key's balance lives here: verify checks
 * and spends it under the entry's spinlock, so N concurrent verifications
 * of a key with C credits get exactly min(N, C) VALID, and verify writes
 * no row.  The database's worker subtracts what was spent from the
 * column, relative to what is there (so it commutes with add_credits),
 * and never more than was spent: a crash loses at most the spending not
 * yet written, which hands credits back rather than taking any.
 *
 * Every other change of a key's credits or refill bumps its credits_gen.
 * A verification that reads a newer generation than the entry's reloads
 * the balance: the column as the latest snapshot sees it, less the
 * spending that column does not hold yet (pending, and in flight unless
 * that snapshot sees the flush committed).  Each balance names the
 * apikeys.keys it is of: a table dropped and made again (pg_restore
 * --clean) has rows that know nothing of the old one's balances and
 * spending, which are forgotten.  A standby spends nothing:
 * nothing there could write it, and its balance would not be the
 * primary's; credit-limited keys are refused there (see verify.c).
 */
#include "postgres.h"

#include "access/transam.h"
#include "access/xlog.h"
#include "catalog/namespace.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "pgtime.h"
#include "port/pg_bitutils.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/datetime.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/lsyscache.h"
#include "utils/snapmgr.h"

#include "apikeys.h"
#include "fastindex.h"
#include "credits.h"

/* Partitions of the table, each with its own lock. */
#define CREDIT_PARTITIONS 16

/* GUC apikeys.max_credit_keys: credit-limited keys held at once across databases. */
static int	max_credit_keys = 100000;

typedef struct CreditKey
{
	Oid			dboid;
	pg_uuid_t	key_id;
} CreditKey;

typedef struct CreditEntry
{
	CreditKey	key;
	slock_t		mutex;
	Oid			relid;			/* the apikeys.keys whose row balance is of */
	int64		gen;			/* the row generation balance follows; -1: none yet */
	CreditRefill refill;		/* that generation's refill */
	int64		refill_amount;
	int32		period;			/* the refill period balance belongs to */
	int64		balance;		/* what the key has left */
	int64		pending;		/* spent in period, not yet taken by a flush (< 0: refunds) */
	int64		inflight;		/* taken by the flush inflight_xid */
	CreditRefill inflight_refill;
	int32		inflight_period;
	TransactionId inflight_xid;
	int64		settled;		/* what the last committed flush wrote, in */
	int32		settled_period; /* that period, for readers whose snapshot */
	TransactionId settled_xid;	/* missed its commit */
} CreditEntry;

static HTAB *credit_table = NULL;
/*
 * The fast index: per slot, the address of the entry found there last, or
 * 0.  A slot takes its partition's bits from the hash, so the partition's
 * lock covers it; removing an entry clears its slot, so a slot names a
 * live entry or none, and verify reaches a balance without walking a
 * bucket chain.
 */
static pg_atomic_uint64 *fast_slots = NULL;
static uint32 fast_mask;
/* Set when a pass found nothing to evict; cleared by a flush, which makes entries idle. */
static pg_atomic_uint32 *evict_futile = NULL;
static LWLock *partition_locks[CREDIT_PARTITIONS];
static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/*
 * Slots of the fast index: a power of two, at least twice the entries, so
 * that few share one, and at least the partitions, so that a slot's index
 * keeps its partition's bits.
 */
static uint32
fast_slot_count(void)
{
	return pg_nextpower2_32((uint32) Max(max_credit_keys, CREDIT_PARTITIONS) * 2);
}

/* Reserves the table, its fast index and its locks, a tranche of their own (postmaster). */
static void
credits_shmem_request(void)
{
	Size		size = MAXALIGN(sizeof(pg_atomic_uint32));

	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	size = add_size(size, MAXALIGN(mul_size(fast_slot_count(), sizeof(pg_atomic_uint64))));
	size = add_size(size, hash_estimate_size(max_credit_keys, sizeof(CreditEntry)));
	RequestAddinShmemSpace(size);
	RequestNamedLWLockTranche("apikeys credits", CREDIT_PARTITIONS);
}

/* Attaches to (or creates) the table. */
static void
credits_shmem_startup(void)
{
	HASHCTL		info;
	LWLockPadded *locks;
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	locks = GetNamedLWLockTranche("apikeys credits");
	for (int i = 0; i < CREDIT_PARTITIONS; i++)
		partition_locks[i] = &locks[i].lock;
	evict_futile = ShmemInitStruct("apikeys credits eviction", sizeof(pg_atomic_uint32), &found);
	if (!found)
		pg_atomic_init_u32(evict_futile, 0);
	fast_mask = fast_slot_count() - 1;
	fast_slots = ShmemInitStruct("apikeys credits fast index",
								 sizeof(pg_atomic_uint64) * fast_slot_count(), &found);
	if (!found)
		for (uint32 i = 0; i <= fast_mask; i++)
			pg_atomic_init_u64(&fast_slots[i], 0);
	memset(&info, 0, sizeof(info));
	info.keysize = sizeof(CreditKey);
	info.entrysize = sizeof(CreditEntry);
	info.num_partitions = CREDIT_PARTITIONS;
	credit_table = ShmemInitHash("apikeys credits", max_credit_keys, max_credit_keys, &info,
								 HASH_ELEM | HASH_BLOBS | HASH_PARTITION);
	LWLockRelease(AddinShmemInitLock);
}

/* Defines apikeys.max_credit_keys and reserves the table (from _PG_init, preloaded only). */
void
credits_init(void)
{
	if (!process_shared_preload_libraries_in_progress)
		return;
	DefineCustomIntVariable("apikeys.max_credit_keys",
							"Credit-limited keys whose balances shared memory holds at once, across databases.",
							"A credit-limited key finds no room only when every held balance has spending not yet written; it is then refused.",
							&max_credit_keys,
							100000, 100, 10000000,
							PGC_POSTMASTER,
							0,
							NULL, NULL, NULL);
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = credits_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = credits_shmem_startup;
}

/* The refill period of a moment: UTC days or months since 1970, 0 without refill. */
int32
credit_period(CreditRefill refill, TimestampTz at)
{
	struct pg_tm tm;
	fsec_t		fsec;

	switch (refill)
	{
		case REFILL_DAY:
			/* Floor division: days since 2000-01-01 plus those from 1970. */
			return (int32) ((at >= 0 ? at / USECS_PER_DAY : (at - USECS_PER_DAY + 1) / USECS_PER_DAY) +
							(POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE));
		case REFILL_MONTH:
			/* No time zone: the fields are UTC. */
			if (timestamp2tm(at, NULL, &tm, &fsec, NULL, NULL) != 0)
				return 0;
			return (tm.tm_year - 1970) * 12 + tm.tm_mon - 1;
		case REFILL_NONE:
			break;
	}
	return 0;
}

/* The lock of the partition a hash value falls in. */
static inline LWLock *
partition_lock(uint32 hashvalue)
{
	return partition_locks[hashvalue % CREDIT_PARTITIONS];
}

/* Every partition, always in the same order. */
static void
lock_all(LWLockMode mode)
{
	for (int i = 0; i < CREDIT_PARTITIONS; i++)
		LWLockAcquire(partition_locks[i], mode);
}

/* Releases what lock_all() took. */
static void
unlock_all(void)
{
	for (int i = CREDIT_PARTITIONS - 1; i >= 0; i--)
		LWLockRelease(partition_locks[i]);
}

/* The hash key of a key in this database, padding zeroed. */
static void
credit_key(CreditKey *key, Oid dboid, const pg_uuid_t *key_id)
{
	memset(key, 0, sizeof(CreditKey));
	key->dboid = dboid;
	memcpy(&key->key_id, key_id, sizeof(pg_uuid_t));
}

/*
 * Finds an entry: through the fast index when its slot names it, else in
 * the table, and then names it there.  Call with its partition's lock held.
 */
static CreditEntry *
lookup_entry(const CreditKey *key, uint32 hashvalue)
{
	return fast_index_find(credit_table, &fast_slots[hashvalue & fast_mask], key,
						   sizeof(CreditKey), hashvalue);
}

/*
 * Forgets an entry, and its name in the fast index, so that no slot names
 * memory the table may reuse.  Call with its partition's lock held
 * exclusively.
 */
static void
remove_entry(CreditEntry *e)
{
	uint32		hashvalue = get_hash_value(credit_table, &e->key);

	fast_index_remove(credit_table, &fast_slots[hashvalue & fast_mask], e, hashvalue);
}

/* The fast-index slot credits_prefetch_slot() fetched for the next spending, or -1. */
static int64 prefetched_slot = -1;

/* Starts fetching the fast-index slot of a key's balance, well before credits_spend() reads it. */
void
credits_prefetch_slot(const pg_uuid_t *key_id)
{
	CreditKey	key;

	prefetched_slot = -1;
	if (credit_table == NULL)
		return;
	credit_key(&key, MyDatabaseId, key_id);
	prefetched_slot = get_hash_value(credit_table, &key) & fast_mask;
	prefetch_line(&fast_slots[prefetched_slot]);
}

/*
 * Starts fetching the lines of the balance that slot names.  Without a
 * lock: the entry may be gone, and the fetch in vain.
 */
void
credits_prefetch_entry(void)
{
	if (prefetched_slot < 0)
		return;
	fast_index_prefetch(&fast_slots[prefetched_slot], offsetof(CreditEntry, pending),
						offsetof(CreditEntry, pending));
	prefetched_slot = -1;
}

/* Whether an entry holds nothing the table lacks (so it may be forgotten and reloaded). */
static inline bool
entry_idle(CreditEntry *e)
{
	return e->pending == 0 && !TransactionIdIsValid(e->inflight_xid);
}

/* Whether in-flight spending belongs to the entry's refill and period. */
static inline bool
inflight_current(CreditEntry *e)
{
	return e->inflight_refill == e->refill && e->inflight_period == e->period;
}

/*
 * Starts a new refill period in the entry, by the refill of the generation
 * it follows (not the caller's row, which may be older): the balance is the
 * refill amount again, and spending of the past period, not yet taken, need
 * not be written (the column is read as refilled).  Caller holds the
 * spinlock.
 */
static void
enter_period(CreditEntry *e, TimestampTz now)
{
	int32		period;

	if (e->refill == REFILL_NONE)
		return;
	period = credit_period(e->refill, now);
	if (e->period < period)
	{
		e->balance = e->refill_amount;
		e->pending = 0;
		e->period = period;
	}
}

/*
 * The clock enter_period() needs: none for an entry without refill, which
 * is spared the call.  Caller holds the partition's lock, so the entry's
 * refill cannot change before the spinlock is taken.
 */
static inline TimestampTz
refill_clock(CreditEntry *e)
{
	return e->refill != REFILL_NONE ? GetCurrentTimestamp() : 0;
}

/* Spends cost unless fewer are left.  Caller holds the spinlock. */
static bool
spend(CreditEntry *e, int64 cost, int64 *remaining, int32 *period)
{
	bool		spent = e->balance >= cost;

	if (spent)
	{
		e->balance -= cost;
		e->pending += cost;
	}
	*remaining = e->balance;
	*period = e->period;
	return spent;
}

/*
 * Makes room in a full table by forgetting up to 64 idle entries.  A pass
 * that found none is not repeated before a flush has made some idle, so a
 * flood of new keys into a full table costs no pass each.  Call with no
 * partition lock held.
 */
static void
evict_idle(void)
{
	HASH_SEQ_STATUS status;
	CreditEntry *e;
	int			evicted = 0;

	if (pg_atomic_read_u32(evict_futile) != 0)
		return;
	lock_all(LW_EXCLUSIVE);
	hash_seq_init(&status, credit_table);
	while ((e = hash_seq_search(&status)) != NULL)
	{
		if (entry_idle(e))
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
		pg_atomic_write_u32(evict_futile, 1);
}

typedef enum LoadResult
{
	LOADED,
	LOAD_UNLIMITED,				/* the key has no credit limit (any more) */
	LOAD_UNCOMMITTED			/* its latest balance is this transaction's own */
} LoadResult;

/*
 * Loads (or reloads, for a newer generation) a key's balance from the
 * row's latest version: the column less the spending it does not hold yet
 * (pending, and in flight unless the snapshot the column was read with sees
 * the flush commit).  Call with the partition lock held exclusively: no
 * one else touches the entry meanwhile, and no flush takes or settles its
 * spending.  The caller has opened and locked the relations the reader
 * reads, so no heavyweight lock is waited for here.  A balance this
 * transaction set is not loaded: it may yet roll back.
 */
static LoadResult
load_entry(CreditEntry *e, CreditRowReader reader, void *arg)
{
	Snapshot	snapshot = RegisterSnapshot(GetLatestSnapshot());
	CreditRow	latest;
	LoadResult	result = LOADED;

	if (!reader(arg, snapshot, &latest) || latest.credits < 0)
		result = LOAD_UNLIMITED;
	else if (latest.own)
		result = LOAD_UNCOMMITTED;
	else
	{
		int32		period = credit_period(latest.refill, GetCurrentTimestamp());
		bool		same_period = e->gen >= 0 && e->refill == latest.refill && e->period == period;
		int64		unwritten = same_period ? e->pending : 0;
		int64		base = latest.refill_amount > 0 && latest.period < period
			? latest.refill_amount : latest.credits;

		/* Outside any spinlock: these may read the commit log. */
		if (TransactionIdIsValid(e->inflight_xid) && e->inflight_refill == latest.refill &&
			e->inflight_period == period &&
			!(TransactionIdDidCommit(e->inflight_xid) &&
			  !XidInMVCCSnapshot(e->inflight_xid, snapshot)))
			unwritten += e->inflight;

		SpinLockAcquire(&e->mutex);
		/* Spending under another refill or period is not the column's: refilled away. */
		if (!same_period)
			e->pending = 0;
		e->balance = Max(base - unwritten, 0);
		e->gen = latest.gen;
		e->refill = latest.refill;
		e->refill_amount = latest.refill_amount;
		e->period = period;
		SpinLockRelease(&e->mutex);
	}
	UnregisterSnapshot(snapshot);
	return result;
}

/* Spends cost credits of a key unless it has fewer left. */
CreditOutcome
credits_spend(const pg_uuid_t *key_id, Oid relid, const CreditRow *row, int64 cost,
			  CreditRowReader reader, void *reader_arg, int64 *remaining, int32 *period)
{
	CreditKey	key;
	uint32		hashvalue;
	LWLock	   *lock;
	CreditEntry *e;
	bool		found;
	bool		spent;
	TimestampTz now;

	*remaining = -1;
	*period = 0;
	if (credit_table == NULL || RecoveryInProgress())
		return CREDITS_REFUSED;

	credit_key(&key, MyDatabaseId, key_id);
	hashvalue = get_hash_value(credit_table, &key);
	lock = partition_lock(hashvalue);

	/*
	 * The usual case: the entry follows the caller's row's generation, or a
	 * newer one (the caller's snapshot may be older than the entry).  Its
	 * table, generation and refill change only under the exclusive lock.
	 */
	LWLockAcquire(lock, LW_SHARED);
	e = lookup_entry(&key, hashvalue);
	if (e != NULL && e->relid == relid && e->gen >= row->gen)
	{
		now = refill_clock(e);
		SpinLockAcquire(&e->mutex);
		enter_period(e, now);
		spent = spend(e, cost, remaining, period);
		SpinLockRelease(&e->mutex);
		LWLockRelease(lock);
		return spent ? CREDITS_SPENT : CREDITS_EXCEEDED;
	}
	LWLockRelease(lock);

	/* A first use, or a newer generation: (re)load from the table. */
	if (reader == NULL)
		return CREDITS_NEED_READER;
	if (e == NULL && hash_get_num_entries(credit_table) >= max_credit_keys)
		evict_idle();
	LWLockAcquire(lock, LW_EXCLUSIVE);
	e = lookup_entry(&key, hashvalue);
	found = e != NULL;
	if (!found && hash_get_num_entries(credit_table) < max_credit_keys)
		e = hash_search_with_hash_value(credit_table, &key, hashvalue, HASH_ENTER_NULL, &found);
	if (e == NULL)
	{
		LWLockRelease(lock);
		return CREDITS_REFUSED;
	}
	if (!found)
	{
		SpinLockInit(&e->mutex);
		pg_atomic_write_u64(&fast_slots[hashvalue & fast_mask], (uint64) (uintptr_t) e);
	}
	if (!found || e->relid != relid)
	{
		/*
		 * Fully set before anything can fail: a failed load leaves it to
		 * reload.  An entry of another table's row loses its spending too:
		 * that table is gone, and the spending has nowhere to go.
		 */
		e->relid = relid;
		e->gen = -1;
		e->refill = REFILL_NONE;
		e->refill_amount = 0;
		e->period = 0;
		e->balance = 0;
		e->pending = 0;
		e->inflight = 0;
		e->inflight_refill = REFILL_NONE;
		e->inflight_period = 0;
		e->inflight_xid = InvalidTransactionId;
		e->settled = 0;
		e->settled_period = 0;
		e->settled_xid = InvalidTransactionId;
	}
	if (e->gen < row->gen)
	{
		LoadResult	loaded = load_entry(e, reader, reader_arg);

		if (loaded != LOADED)
		{
			if (e->gen < 0)
				remove_entry(e);
			LWLockRelease(lock);
			/* No credit limit any more: nothing to spend.  Uncommitted: fail closed. */
			return loaded == LOAD_UNLIMITED ? CREDITS_SPENT : CREDITS_REFUSED;
		}
	}
	now = refill_clock(e);
	SpinLockAcquire(&e->mutex);
	enter_period(e, now);
	spent = spend(e, cost, remaining, period);
	SpinLockRelease(&e->mutex);
	LWLockRelease(lock);
	return spent ? CREDITS_SPENT : CREDITS_EXCEEDED;
}

/* Gives back what credits_spend() took, unless a new period began meanwhile. */
void
credits_refund(const pg_uuid_t *key_id, int32 period, int64 cost, int64 *remaining)
{
	CreditKey	key;
	uint32		hashvalue;
	LWLock	   *lock;
	CreditEntry *e;

	if (credit_table == NULL)
		return;
	credit_key(&key, MyDatabaseId, key_id);
	hashvalue = get_hash_value(credit_table, &key);
	lock = partition_lock(hashvalue);
	LWLockAcquire(lock, LW_SHARED);
	/* An entry with spending pending or in flight is never idle, so it is still there. */
	e = lookup_entry(&key, hashvalue);
	if (e != NULL)
	{
		SpinLockAcquire(&e->mutex);
		e->balance += cost;
		/* Pending may go below zero if a flush took the spending meanwhile: it writes it back. */
		if (e->period == period)
			e->pending -= cost;
		*remaining = e->balance;
		SpinLockRelease(&e->mutex);
	}
	LWLockRelease(lock);
}

/*
 * Settles what an earlier flush took: written if its transaction
 * committed (and kept as the last settled flush, for readers whose
 * snapshot does not see that commit), pending again if not (and still of
 * the entry's period).  Caller holds the spinlock.
 */
static void
settle_inflight(CreditEntry *e, bool committed)
{
	if (committed)
	{
		e->settled = e->inflight;
		e->settled_period = e->inflight_period;
		e->settled_xid = e->inflight_xid;
	}
	else if (inflight_current(e))
		e->pending += e->inflight;
	e->inflight = 0;
	e->inflight_xid = InvalidTransactionId;
}

/*
 * Takes a database's unwritten spending for a flush transaction; that of
 * balances of another apikeys.keys than relid (InvalidOid: the extension
 * is gone) is forgotten, as it has nowhere to go.
 */
int
credits_take_pending(Oid dboid, Oid relid, TransactionId xid, CreditDelta **result)
{
	HASH_SEQ_STATUS status;
	CreditEntry *e;
	CreditDelta *out;
	int			n = 0;
	int			size = 64;

	*result = NULL;
	if (credit_table == NULL)
		return 0;
	lock_all(LW_SHARED);
	out = palloc(sizeof(CreditDelta) * size);
	hash_seq_init(&status, credit_table);
	while ((e = hash_seq_search(&status)) != NULL)
	{
		TransactionId earlier;
		bool		committed = false;

		if (e->key.dboid != dboid)
			continue;
		/* Only this database's worker writes the in-flight fields. */
		earlier = e->inflight_xid;
		if (TransactionIdIsValid(earlier))
			committed = TransactionIdDidCommit(earlier);
		SpinLockAcquire(&e->mutex);
		if (TransactionIdIsValid(earlier))
			settle_inflight(e, committed);
		if (e->relid != relid)
			e->pending = 0;
		if (e->pending != 0)
		{
			if (n == size)
			{
				size *= 2;
				out = repalloc(out, sizeof(CreditDelta) * size);
			}
			out[n].entry = e;
			out[n].written = false;
			memcpy(&out[n].key_id, &e->key.key_id, sizeof(pg_uuid_t));
			out[n].spent = e->pending;
			out[n].refill = e->refill;
			out[n].period = e->period;
			n++;
			e->inflight = e->pending;
			e->inflight_refill = e->refill;
			e->inflight_period = e->period;
			e->inflight_xid = xid;
			e->pending = 0;
		}
		SpinLockRelease(&e->mutex);
	}
	unlock_all();
	*result = out;
	return n;
}

/* Settles what a flush took: written (committed) or not, by deltas[i].written or all. */
static void
settle_deltas(TransactionId xid, const CreditDelta *deltas, int n, bool only_unwritten)
{
	lock_all(LW_SHARED);
	for (int i = 0; i < n; i++)
	{
		CreditEntry *e = deltas[i].entry;

		if (only_unwritten && deltas[i].written)
			continue;
		SpinLockAcquire(&e->mutex);
		if (e->inflight_xid == xid)
			settle_inflight(e, deltas[i].written);
		SpinLockRelease(&e->mutex);
	}
	unlock_all();
}

/*
 * Before the flush transaction xid commits: what it skipped (a row another
 * transaction had locked) is pending again, so that from its commit on, a
 * reader that sees xid committed may take all that is still in flight to
 * be in the column.  No lookup: an entry with spending in flight is never
 * idle, so nothing removes it meanwhile.
 */
void
credits_take_back_unwritten(TransactionId xid, const CreditDelta *deltas, int n)
{
	if (credit_table != NULL)
		settle_deltas(xid, deltas, n, true);
}

/*
 * After the flush transaction xid committed: what it wrote is in the
 * table.  Every partition is held in shared mode, as evict_idle() holds
 * them exclusively.
 */
void
credits_flush_done(TransactionId xid, const CreditDelta *deltas, int n)
{
	if (credit_table == NULL)
		return;
	settle_deltas(xid, deltas, n, false);
	pg_atomic_write_u32(evict_futile, 0);
}

/* Forgets every balance of a database that is gone. */
void
credits_discard(Oid dboid)
{
	HASH_SEQ_STATUS status;
	CreditEntry *e;

	if (credit_table == NULL)
		return;
	lock_all(LW_EXCLUSIVE);
	hash_seq_init(&status, credit_table);
	while ((e = hash_seq_search(&status)) != NULL)
		if (e->key.dboid == dboid)
			remove_entry(e);
	unlock_all();
}

/* Whether an entry has spending a flush must still write or settle. */
static bool
entry_has_work(CreditEntry *e)
{
	bool		has;

	SpinLockAcquire(&e->mutex);
	has = !entry_idle(e);
	SpinLockRelease(&e->mutex);
	return has;
}

/* Adds the databases with spending to write to a list of OIDs. */
List *
credits_databases_with_spending(List *dboids)
{
	HASH_SEQ_STATUS status;
	CreditEntry *e;

	if (credit_table == NULL)
		return dboids;
	lock_all(LW_SHARED);
	hash_seq_init(&status, credit_table);
	while ((e = hash_seq_search(&status)) != NULL)
		if (entry_has_work(e))
			dboids = list_append_unique_oid(dboids, e->key.dboid);
	unlock_all();
	return dboids;
}

/* Whether the database has spending to write. */
bool
credits_has_pending(Oid dboid)
{
	HASH_SEQ_STATUS status;
	CreditEntry *e;
	bool		pending = false;

	if (credit_table == NULL)
		return false;
	lock_all(LW_SHARED);
	hash_seq_init(&status, credit_table);
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

PG_FUNCTION_INFO_V1(apikeys_credits_unflushed);

/*
 * _credits_unflushed(key_id, period): credits spent in that refill period
 * and not in apikeys.keys.credits as the caller's snapshot sees it.
 */
Datum
apikeys_credits_unflushed(PG_FUNCTION_ARGS)
{
	CreditKey	key;
	uint32		hashvalue;
	LWLock	   *lock;
	CreditEntry *e;
	int32		period = PG_GETARG_INT32(1);
	int64		unwritten = 0;
	Oid			nsp = get_namespace_oid("apikeys", true);
	Oid			relid = OidIsValid(nsp) ? get_relname_relid("keys", nsp) : InvalidOid;

	if (credit_table == NULL)
		PG_RETURN_INT64(0);
	credit_key(&key, MyDatabaseId, PG_GETARG_UUID_P(0));
	hashvalue = get_hash_value(credit_table, &key);
	lock = partition_lock(hashvalue);
	LWLockAcquire(lock, LW_SHARED);
	e = lookup_entry(&key, hashvalue);
	if (e != NULL && e->relid == relid)
	{
		Snapshot	snapshot = ActiveSnapshotSet() ? GetActiveSnapshot() : GetTransactionSnapshot();
		TransactionId xid;
		int64		inflight;
		int32		inflight_period;
		TransactionId settled_xid;
		int64		settled;
		int32		settled_period;

		SpinLockAcquire(&e->mutex);
		unwritten = e->period == period ? e->pending : 0;
		xid = e->inflight_xid;
		inflight = e->inflight;
		inflight_period = e->inflight_period;
		settled_xid = e->settled_xid;
		settled = e->settled;
		settled_period = e->settled_period;
		SpinLockRelease(&e->mutex);
		if (TransactionIdIsValid(xid) && inflight_period == period &&
			!(TransactionIdDidCommit(xid) && !XidInMVCCSnapshot(xid, snapshot)))
			unwritten += inflight;
		/* The last flush settled may have committed after our snapshot too. */
		if (TransactionIdIsValid(settled_xid) && settled_period == period &&
			XidInMVCCSnapshot(settled_xid, snapshot))
			unwritten += settled;
	}
	LWLockRelease(lock);
	PG_RETURN_INT64(unwritten);
}
