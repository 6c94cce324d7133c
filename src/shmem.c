/*
 * shmem.c — the shared-memory queue of audit records and the worker registry.
 *
 * The queue is a fixed-size shared hash keyed by what records merge on, so a
 * flood of identical failures costs one entry; when it is full, new kinds of
 * record are counted as dropped rather than waited for.  The lock is held
 * only for a hash probe or to copy entries out, never across I/O.
 */
#include "postgres.h"

#include "access/xlog.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "storage/shmem.h"
#include "utils/hsearch.h"
#include "utils/timestamp.h"

#include "shmem.h"
#include "usage.h"
#include "worker.h"

ApikeysShared *apikeys_shared = NULL;
int			apikeys_audit_queue_size = 1024;

static HTAB *event_queue = NULL;
static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* A slot whose worker has not reported in this long is started again. */
#define WORKER_START_TIMEOUT_MS 10000

static void
apikeys_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(ApikeysShared)));
	RequestAddinShmemSpace(hash_estimate_size(apikeys_audit_queue_size, sizeof(QueuedEvent)));
	RequestAddinShmemSpace(usage_shmem_size());
	RequestNamedLWLockTranche("apikeys", 1 + APIKEYS_USAGE_PARTITIONS);
}

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
		LWLockPadded *locks = GetNamedLWLockTranche("apikeys");

		memset(apikeys_shared, 0, sizeof(ApikeysShared));
		apikeys_shared->lock = &locks[0].lock;
		for (int i = 0; i < APIKEYS_USAGE_PARTITIONS; i++)
			apikeys_shared->usage_locks[i] = &locks[1 + i].lock;
		pg_atomic_init_u64(&apikeys_shared->worker_generation, 0);
	}
	memset(&info, 0, sizeof(info));
	info.keysize = sizeof(QueuedEventKey);
	info.entrysize = sizeof(QueuedEvent);
	event_queue = ShmemInitHash("apikeys event queue",
								apikeys_audit_queue_size, apikeys_audit_queue_size,
								&info, HASH_ELEM | HASH_BLOBS);
	usage_shmem_init();
	LWLockRelease(AddinShmemInitLock);
}

void
apikeys_shmem_init_hooks(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = apikeys_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = apikeys_shmem_startup;
}

bool
apikeys_enqueue(const QueuedEventKey *key, const char *owner,
				const char *actor, const char *db_user, const char *details)
{
	QueuedEvent *entry;
	bool		found;

	if (apikeys_shared == NULL || event_queue == NULL)
		return false;

	LWLockAcquire(apikeys_shared->lock, LW_EXCLUSIVE);
	entry = hash_search(event_queue, key, HASH_FIND, &found);
	/* A shared hash can outgrow its size into spare shared memory: cap it. */
	if (entry == NULL && hash_get_num_entries(event_queue) < apikeys_audit_queue_size)
		entry = hash_search(event_queue, key, HASH_ENTER_NULL, &found);
	if (entry == NULL)
	{
		apikeys_shared->dropped++;
		LWLockRelease(apikeys_shared->lock);
		return false;
	}
	if (!found)
	{
		entry->count = 0;
		strlcpy(entry->owner, owner ? owner : "", sizeof(entry->owner));
		strlcpy(entry->actor, actor ? actor : "", sizeof(entry->actor));
		strlcpy(entry->db_user, db_user ? db_user : "", sizeof(entry->db_user));
		strlcpy(entry->details, details ? details : "{}", sizeof(entry->details));
	}
	entry->count++;
	apikeys_shared->queued_total++;
	LWLockRelease(apikeys_shared->lock);
	return true;
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
		/* Removing the element just returned is allowed during a scan. */
		hash_search(event_queue, &entry->key, HASH_REMOVE, NULL);
	}
	LWLockRelease(apikeys_shared->lock);
	return n;
}

int64
apikeys_queued_now(void)
{
	int64		n;

	if (apikeys_shared == NULL)
		return 0;
	LWLockAcquire(apikeys_shared->lock, LW_SHARED);
	n = hash_get_num_entries(event_queue);
	LWLockRelease(apikeys_shared->lock);
	return n;
}

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

/* Queued records or usage counts of the database; the caller holds the queue lock. */
static bool
has_pending_locked(Oid dboid)
{
	return queue_has_records(dboid) || usage_has_pending(dboid);
}

static WorkerSlot *
find_slot(Oid dboid)
{
	for (int i = 0; i < APIKEYS_MAX_DB_WORKERS; i++)
		if (apikeys_shared->workers[i].dboid == dboid)
			return &apikeys_shared->workers[i];
	return NULL;
}

/* Generation at which this backend last saw its database's worker. */
static uint64 worker_seen_generation = PG_UINT64_MAX;

void
apikeys_note_pending(void)
{
	ApikeysShared *sh = apikeys_shared;
	uint64		generation;
	TimestampTz now;
	WorkerSlot *slot;
	bool		start = false;

	/* A standby keeps nothing for a worker, which could not start there anyway. */
	if (sh == NULL || !OidIsValid(MyDatabaseId) || RecoveryInProgress())
		return;

	/*
	 * Pairs with apikeys_retire_if_idle(), which bumps the generation before
	 * it looks for pending work: either it sees ours, or we see its bump.
	 */
	pg_memory_barrier();
	generation = pg_atomic_read_u64(&sh->worker_generation);
	if (generation == worker_seen_generation)
		return;

	now = GetCurrentTimestamp();
	LWLockAcquire(sh->lock, LW_EXCLUSIVE);
	slot = find_slot(MyDatabaseId);
	if (slot != NULL &&
		(slot->pid != 0 ||
		 !TimestampDifferenceExceeds(slot->requested_at, now, WORKER_START_TIMEOUT_MS)))
		worker_seen_generation = generation;
	else
	{
		if (slot == NULL)
			slot = find_slot(InvalidOid);
		if (slot != NULL)
		{
			slot->dboid = MyDatabaseId;
			slot->pid = 0;
			slot->requested_at = now;
			start = true;
		}
	}
	LWLockRelease(sh->lock);

	if (start)
	{
		if (apikeys_start_worker())
			worker_seen_generation = generation;
		else
		{
			/* No free worker process now: a later call tries again. */
			LWLockAcquire(sh->lock, LW_EXCLUSIVE);
			if (slot->dboid == MyDatabaseId && slot->pid == 0)
				memset(slot, 0, sizeof(WorkerSlot));
			LWLockRelease(sh->lock);
		}
	}
}

bool
apikeys_claim_slot(Oid dboid)
{
	WorkerSlot *slot;
	bool		claimed = false;

	LWLockAcquire(apikeys_shared->lock, LW_EXCLUSIVE);
	slot = find_slot(dboid);
	if (slot == NULL)
		slot = find_slot(InvalidOid);
	if (slot != NULL && (slot->pid == 0 || slot->pid == MyProcPid))
	{
		slot->dboid = dboid;
		slot->pid = MyProcPid;
		claimed = true;
	}
	LWLockRelease(apikeys_shared->lock);
	return claimed;
}

bool
apikeys_retire_if_idle(Oid dboid)
{
	bool		idle;

	LWLockAcquire(apikeys_shared->lock, LW_EXCLUSIVE);
	pg_atomic_fetch_add_u64(&apikeys_shared->worker_generation, 1);
	idle = !has_pending_locked(dboid);
	if (idle)
	{
		WorkerSlot *slot = find_slot(dboid);

		if (slot != NULL && slot->pid == MyProcPid)
			memset(slot, 0, sizeof(WorkerSlot));
	}
	LWLockRelease(apikeys_shared->lock);
	return idle;
}

bool
apikeys_has_pending(Oid dboid)
{
	bool		pending;

	LWLockAcquire(apikeys_shared->lock, LW_SHARED);
	pending = has_pending_locked(dboid);
	LWLockRelease(apikeys_shared->lock);
	return pending;
}

void
apikeys_release_own_slot(void)
{
	LWLockAcquire(apikeys_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < APIKEYS_MAX_DB_WORKERS; i++)
		if (apikeys_shared->workers[i].pid == MyProcPid)
			memset(&apikeys_shared->workers[i], 0, sizeof(WorkerSlot));
	pg_atomic_fetch_add_u64(&apikeys_shared->worker_generation, 1);
	LWLockRelease(apikeys_shared->lock);
}

void
apikeys_wake_worker(Oid dboid)
{
	pid_t		pid = 0;
	PGPROC	   *proc;

	LWLockAcquire(apikeys_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < APIKEYS_MAX_DB_WORKERS; i++)
	{
		if (apikeys_shared->workers[i].dboid == dboid)
		{
			apikeys_shared->workers[i].flush_requested = true;
			pid = apikeys_shared->workers[i].pid;
		}
	}
	LWLockRelease(apikeys_shared->lock);

	if (pid != 0 && (proc = BackendPidGetProc(pid)) != NULL)
		SetLatch(&proc->procLatch);
}

bool
apikeys_take_flush_request(Oid dboid)
{
	WorkerSlot *slot;
	bool		requested = false;

	LWLockAcquire(apikeys_shared->lock, LW_EXCLUSIVE);
	slot = find_slot(dboid);
	if (slot != NULL && slot->pid == MyProcPid)
	{
		requested = slot->flush_requested;
		slot->flush_requested = false;
	}
	LWLockRelease(apikeys_shared->lock);
	return requested;
}
