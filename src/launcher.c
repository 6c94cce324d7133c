/*
 * launcher.c — one process that starts, watches and retires the
 * per-database workers, as autovacuum's launcher and pg_cron do.
 *
 * Backends only mark a database as wanting a worker; the launcher alone
 * registers workers, and the postmaster tells it when each one starts and
 * exits, so every slot of the registry has one owner and every outcome is
 * handled:
 *   - a worker that exits after connecting (it had nothing left to write,
 *     or it was terminated): its slot is freed if the database has nothing
 *     queued, else the worker is started again;
 *   - a worker that could not start (no free background worker process) or
 *     could not connect: if its database is gone, the database's queued
 *     records (counted as lost) and usage counts are discarded and the slot
 *     is freed; otherwise the start is retried, after 1, 2, 4 ... 60 s.
 * Workers connect even to a database that does not allow connections.  The
 * launcher runs on a primary only (a standby writes nothing).
 */
#include "postgres.h"

#include "access/xact.h"
#include "common/int.h"
#include "fmgr.h"
#include "access/xlog.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/syscache.h"

#include "credits.h"
#include "launcher.h"
#include "queue.h"
#include "usage.h"

/* Databases that can have a worker at once. */
#define APIKEYS_MAX_DB_WORKERS	64

typedef enum SlotState
{
	SLOT_FREE = 0,				/* dboid is InvalidOid */
	SLOT_WANTED,				/* the database has work and no worker */
	SLOT_STARTED				/* the launcher registered a worker for it */
} SlotState;

typedef struct WorkerSlot
{
	Oid			dboid;
	SlotState	state;
	uint32		start_id;		/* which registration the worker must be */
	bool		connected;		/* that worker connected to the database */
	pid_t		pid;			/* that worker, while it runs */
	bool		flush_requested;	/* flush before the interval ends (an alert, flush()) */
	bool		usage_requested;	/* ... and write usage counts in that flush */
	uint64		flushes_started;	/* by this slot's current worker */
	uint64		flushes_done;	/* the last of them that completed */
	uint64		sessions_counting;	/* sessions that began counting here (see launcher_note_pending()) */
	int			failed_starts;	/* in a row */
	TimestampTz retry_at;
} WorkerSlot;

typedef struct Registry
{
	LWLock	   *lock;
	Latch	   *launcher_latch; /* NULL while no launcher runs */
	/* Bumped whenever a slot is freed: backends then look again. */
	pg_atomic_uint64 generation;
	uint32		next_start_id;
	/* A backend found every slot taken: some database may wait without one. */
	bool		slots_were_full;
	int64		start_failures;
	int64		flush_failures;
	WorkerSlot	slots[APIKEYS_MAX_DB_WORKERS];
} Registry;

static Registry *registry = NULL;
static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* Longest wait before a failed start is tried again. */
#define RETRY_MAX_MS	60000

/* Reserves the registry and its lock (postmaster). */
static void
launcher_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(Registry)));
	RequestNamedLWLockTranche("apikeys registry", 1);
}

/* Attaches to (or creates) the registry. */
static void
launcher_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	registry = ShmemInitStruct("apikeys registry", sizeof(Registry), &found);
	if (!found)
	{
		memset(registry, 0, sizeof(Registry));
		registry->lock = &GetNamedLWLockTranche("apikeys registry")[0].lock;
		pg_atomic_init_u64(&registry->generation, 0);
	}
	LWLockRelease(AddinShmemInitLock);
}

/* Reserves the registry and registers the launcher (from _PG_init, preload only). */
void
launcher_init(void)
{
	BackgroundWorker worker;

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = launcher_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = launcher_shmem_startup;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 5;
	strlcpy(worker.bgw_library_name, "apikeys", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "apikeys_launcher_main", BGW_MAXLEN);
	strlcpy(worker.bgw_name, "apikeys launcher", BGW_MAXLEN);
	strlcpy(worker.bgw_type, "apikeys launcher", BGW_MAXLEN);
	RegisterBackgroundWorker(&worker);
}

/* The slot of a database (InvalidOid: a free slot), or NULL.  Caller holds the lock. */
static WorkerSlot *
find_slot(Oid dboid)
{
	for (int i = 0; i < APIKEYS_MAX_DB_WORKERS; i++)
		if (registry->slots[i].dboid == dboid)
			return &registry->slots[i];
	return NULL;
}

/* Whether a database has queued records or usage counts to write. */
bool
launcher_database_has_work(Oid dboid)
{
	return queue_has_records(dboid) || usage_has_pending(dboid) || credits_has_pending(dboid);
}

/*
 * Takes a free slot for a database that wants a worker; false when every
 * slot is taken.  Caller holds the lock.
 */
static bool
want_worker(Oid dboid)
{
	WorkerSlot *slot = find_slot(InvalidOid);

	if (slot == NULL)
		return false;
	memset(slot, 0, sizeof(WorkerSlot));
	slot->dboid = dboid;
	slot->state = SLOT_WANTED;
	return true;
}

/* Generation at which this backend last saw its database in the registry. */
static uint64 seen_generation = PG_UINT64_MAX;

/* Makes sure the launcher knows this database has something to write. */
void
launcher_note_pending(void)
{
	uint64		generation;
	Latch	   *latch = NULL;
	WorkerSlot *slot;

	/* A standby keeps nothing for a worker, which could not write there anyway. */
	if (registry == NULL || !OidIsValid(MyDatabaseId) || RecoveryInProgress())
		return;

	/*
	 * Pairs with free_slot(), which bumps the generation before it looks for
	 * pending work: either it sees ours, or we see its bump.
	 */
	pg_memory_barrier();
	generation = pg_atomic_read_u64(&registry->generation);
	if (generation == seen_generation)
		return;

	LWLockAcquire(registry->lock, LW_EXCLUSIVE);
	slot = find_slot(MyDatabaseId);

	/*
	 * Once a session: its worker, asleep with no client connected, learns
	 * that one came (a connection per request may come and go between two
	 * of its looks) and stays.
	 */
	if (slot != NULL)
		slot->sessions_counting++;
	else if (!want_worker(MyDatabaseId))
	{
		/* Every slot is taken: the launcher finds this database once one is free. */
		registry->slots_were_full = true;
	}
	latch = registry->launcher_latch;
	seen_generation = generation;
	LWLockRelease(registry->lock);
	if (latch != NULL)
		SetLatch(latch);
}

/* Asks the database's worker, if one runs, to flush now. */
void
launcher_wake_worker(Oid dboid)
{
	WorkerSlot *slot;
	pid_t		pid = 0;
	PGPROC	   *proc;

	if (registry == NULL)
		return;
	LWLockAcquire(registry->lock, LW_EXCLUSIVE);
	slot = find_slot(dboid);
	if (slot != NULL)
	{
		slot->flush_requested = true;
		pid = slot->pid;
	}
	LWLockRelease(registry->lock);

	if (pid != 0 && (proc = BackendPidGetProc(pid)) != NULL)
		SetLatch(&proc->procLatch);
}

/* In a worker at exit: it no longer runs (the launcher learns the rest from the postmaster). */
static void
worker_exiting(int code, Datum arg)
{
	WorkerSlot *slot;
	Latch	   *latch;

	LWLockAcquire(registry->lock, LW_EXCLUSIVE);
	slot = find_slot(DatumGetObjectId(arg));
	if (slot != NULL && slot->pid == MyProcPid)
		slot->pid = 0;
	latch = registry->launcher_latch;
	LWLockRelease(registry->lock);
	if (latch != NULL)
		SetLatch(latch);
}

/* In a worker, once connected: takes its registry slot; false if it is not its own. */
bool
registry_claim(Oid dboid)
{
	WorkerSlot *slot;
	uint32		start_id;
	bool		claimed = false;

	memcpy(&start_id, MyBgworkerEntry->bgw_extra, sizeof(start_id));
	LWLockAcquire(registry->lock, LW_EXCLUSIVE);
	slot = find_slot(dboid);
	if (slot != NULL && slot->state == SLOT_STARTED && slot->start_id == start_id &&
		!slot->connected)
	{
		slot->connected = true;
		slot->pid = MyProcPid;
		claimed = true;
	}
	LWLockRelease(registry->lock);
	if (claimed)
		before_shmem_exit(worker_exiting, ObjectIdGetDatum(dboid));
	return claimed;
}

/*
 * In a worker: whether a flush was asked for, and with usage counts;
 * *sessions how many sessions have begun counting in the database so far.
 */
bool
registry_take_flush_request(Oid dboid, bool *with_usage, uint64 *sessions)
{
	WorkerSlot *slot;
	bool		requested = false;

	*with_usage = false;
	*sessions = 0;
	LWLockAcquire(registry->lock, LW_EXCLUSIVE);
	slot = find_slot(dboid);
	if (slot != NULL && slot->pid == MyProcPid)
	{
		requested = slot->flush_requested;
		*with_usage = slot->usage_requested;
		*sessions = slot->sessions_counting;
		slot->flush_requested = false;
		slot->usage_requested = false;
	}
	LWLockRelease(registry->lock);
	return requested;
}

/* In a worker: a flush begins; returns its number. */
uint64
registry_flush_starting(Oid dboid)
{
	WorkerSlot *slot;
	uint64		seq = 0;

	LWLockAcquire(registry->lock, LW_EXCLUSIVE);
	slot = find_slot(dboid);
	if (slot != NULL && slot->pid == MyProcPid)
		seq = ++slot->flushes_started;
	LWLockRelease(registry->lock);
	return seq;
}

/* In a worker: the flush numbered seq completed. */
void
registry_flush_done(Oid dboid, uint64 seq)
{
	WorkerSlot *slot;

	LWLockAcquire(registry->lock, LW_EXCLUSIVE);
	slot = find_slot(dboid);
	if (slot != NULL && slot->pid == MyProcPid && seq > slot->flushes_done)
		slot->flushes_done = seq;
	LWLockRelease(registry->lock);
}

/* Counts a flush that failed and was put back. */
void
registry_count_flush_failure(void)
{
	LWLockAcquire(registry->lock, LW_EXCLUSIVE);
	registry->flush_failures++;
	LWLockRelease(registry->lock);
}

/* Workers running now, failed starts and failed flushes since server start. */
void
launcher_stats(int64 *workers, int64 *start_failures, int64 *flush_failures)
{
	*workers = 0;
	*start_failures = 0;
	*flush_failures = 0;
	if (registry == NULL)
		return;
	LWLockAcquire(registry->lock, LW_SHARED);
	for (int i = 0; i < APIKEYS_MAX_DB_WORKERS; i++)
		if (registry->slots[i].state == SLOT_STARTED && registry->slots[i].pid != 0)
			(*workers)++;
	*start_failures = registry->start_failures;
	*flush_failures = registry->flush_failures;
	LWLockRelease(registry->lock);
}

/*
 * The launcher's handles of the workers it registered, by slot; NULL for a
 * slot whose worker an earlier launcher registered.
 */
static BackgroundWorkerHandle *handles[APIKEYS_MAX_DB_WORKERS];

/* Registers the slot's worker; its handle, or NULL when no worker process is free. */
static BackgroundWorkerHandle *
start_worker(Oid dboid, uint32 start_id)
{
	BackgroundWorker worker;
	BackgroundWorkerHandle *handle;
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	strlcpy(worker.bgw_library_name, "apikeys", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "apikeys_worker_main", BGW_MAXLEN);
	snprintf(worker.bgw_name, BGW_MAXLEN, "apikeys worker for database %u", dboid);
	strlcpy(worker.bgw_type, "apikeys worker", BGW_MAXLEN);
	worker.bgw_main_arg = ObjectIdGetDatum(dboid);
	memcpy(worker.bgw_extra, &start_id, sizeof(start_id));
	worker.bgw_notify_pid = MyProcPid;
	if (!RegisterDynamicBackgroundWorker(&worker, &handle))
		handle = NULL;
	MemoryContextSwitchTo(old);
	return handle;
}

/* Whether the database still exists (the launcher reads the shared catalog). */
static bool
database_exists(Oid dboid)
{
	bool		exists;

	StartTransactionCommand();
	exists = SearchSysCacheExists1(DATABASEOID, ObjectIdGetDatum(dboid));
	CommitTransactionCommand();
	return exists;
}

/*
 * After a failed start: try again later.  A worker that could not connect
 * waits twice as long each time; a start that found no free worker process
 * is tried again within a second (and at once when one of the launcher's
 * workers exits), since only a free process is missing.
 */
static void
schedule_retry(WorkerSlot *slot, TimestampTz now, bool no_process)
{
	int			delay_ms = no_process ? 1000 : 1000 << Min(slot->failed_starts, 6);

	if (!no_process)
		slot->failed_starts++;
	slot->state = SLOT_WANTED;
	slot->connected = false;
	slot->pid = 0;
	slot->retry_at = TimestampTzPlusMilliseconds(now, Min(delay_ms, RETRY_MAX_MS));
	registry->start_failures++;
}

/*
 * Frees the slot if its database has nothing to write, else wants a worker
 * for it again.  Caller holds the lock.
 */
static void
free_or_restart(WorkerSlot *slot)
{
	/* Pairs with launcher_note_pending(): bump first, then look. */
	pg_atomic_fetch_add_u64(&registry->generation, 1);
	if (launcher_database_has_work(slot->dboid))
	{
		slot->state = SLOT_WANTED;
		slot->connected = false;
		slot->pid = 0;
		slot->retry_at = 0;
	}
	else
		memset(slot, 0, sizeof(WorkerSlot));
}

/* Whether the slot's worker has exited. */
static bool
worker_stopped(int i)
{
	WorkerSlot *slot = &registry->slots[i];
	pid_t		pid;

	if (handles[i] != NULL)
		return GetBackgroundWorkerPid(handles[i], &pid) == BGWH_STOPPED;
	/* Registered by an earlier launcher: alive while its process is. */
	return slot->pid == 0 || BackendPidGetProc(slot->pid) == NULL;
}

/*
 * When a backend found every slot taken, its database waits without one:
 * look for databases with queued records or counts and no slot, and give
 * them the slots that are free now.
 */
static void
adopt_waiting_databases(void)
{
	List	   *dboids;
	ListCell   *lc;
	bool		all_placed = true;

	LWLockAcquire(registry->lock, LW_SHARED);
	if (!registry->slots_were_full)
	{
		LWLockRelease(registry->lock);
		return;
	}
	LWLockRelease(registry->lock);

	/* Outside the registry lock: the scan takes the queue's and the usage table's. */
	dboids = credits_databases_with_spending(usage_databases_with_counts(queue_databases(NIL)));
	LWLockAcquire(registry->lock, LW_EXCLUSIVE);
	registry->slots_were_full = false;
	foreach(lc, dboids)
		if (find_slot(lfirst_oid(lc)) == NULL && !want_worker(lfirst_oid(lc)))
			all_placed = false;
	if (!all_placed)
		registry->slots_were_full = true;
	LWLockRelease(registry->lock);
	list_free(dboids);
}

/*
 * One pass over the registry: learn which workers have exited and act on
 * each outcome, then start workers for databases that want one.
 */
static void
launcher_pass(void)
{
	TimestampTz now = GetCurrentTimestamp();
	Oid			failed[APIKEYS_MAX_DB_WORKERS];
	int			nfailed = 0;

	LWLockAcquire(registry->lock, LW_EXCLUSIVE);
	for (int i = 0; i < APIKEYS_MAX_DB_WORKERS; i++)
	{
		WorkerSlot *slot = &registry->slots[i];

		if (slot->state != SLOT_STARTED || !worker_stopped(i))
			continue;
		if (handles[i] != NULL)
		{
			pfree(handles[i]);
			handles[i] = NULL;
		}
		if (slot->connected)
		{
			slot->failed_starts = 0;
			free_or_restart(slot);
		}
		else
			failed[nfailed++] = slot->dboid;	/* judged below, outside the lock */
	}
	LWLockRelease(registry->lock);

	/* A worker that never connected: its database may have been dropped. */
	for (int f = 0; f < nfailed; f++)
	{
		bool		exists = database_exists(failed[f]);
		WorkerSlot *slot;

		LWLockAcquire(registry->lock, LW_EXCLUSIVE);
		slot = find_slot(failed[f]);
		if (slot != NULL && slot->state == SLOT_STARTED && !slot->connected)
		{
			if (exists)
				schedule_retry(slot, now, false);
			else
			{
				queue_discard(slot->dboid);
				usage_discard(slot->dboid);
				credits_discard(slot->dboid);
				free_or_restart(slot);
			}
		}
		LWLockRelease(registry->lock);
		if (exists)
			ereport(LOG,
					(errmsg("apikeys worker for database %u could not start; retrying", failed[f])));
	}

	adopt_waiting_databases();

	for (int i = 0; i < APIKEYS_MAX_DB_WORKERS; i++)
	{
		WorkerSlot *slot = &registry->slots[i];
		Oid			dboid;
		uint32		start_id;
		BackgroundWorkerHandle *handle;

		LWLockAcquire(registry->lock, LW_EXCLUSIVE);
		if (slot->state != SLOT_WANTED || slot->retry_at > now)
		{
			LWLockRelease(registry->lock);
			continue;
		}
		dboid = slot->dboid;
		start_id = ++registry->next_start_id;
		slot->state = SLOT_STARTED;
		slot->start_id = start_id;
		slot->connected = false;
		slot->pid = 0;
		slot->flushes_started = 0;
		slot->flushes_done = 0;
		LWLockRelease(registry->lock);

		handle = start_worker(dboid, start_id);

		LWLockAcquire(registry->lock, LW_EXCLUSIVE);
		if (handle != NULL)
			handles[i] = handle;
		else if (slot->dboid == dboid && slot->start_id == start_id)
			schedule_retry(slot, now, true);
		LWLockRelease(registry->lock);
	}
}

/* At the launcher's exit: backends stop waking it. */
static void
launcher_exiting(int code, Datum arg)
{
	LWLockAcquire(registry->lock, LW_EXCLUSIVE);
	registry->launcher_latch = NULL;
	LWLockRelease(registry->lock);
}

/* The launcher: a pass over the registry whenever woken, and every second. */
void
apikeys_launcher_main(Datum main_arg)
{
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();
	/* No database: the launcher reads only the shared catalog pg_database. */
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);

	LWLockAcquire(registry->lock, LW_EXCLUSIVE);
	registry->launcher_latch = MyLatch;
	LWLockRelease(registry->lock);
	before_shmem_exit(launcher_exiting, (Datum) 0);

	for (;;)
	{
		launcher_pass();
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 1000L, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		/*
		 * Exit code 1: the postmaster starts the launcher again unless the
		 * server is stopping (a worker that exits with 0 is forgotten).
		 */
		if (ShutdownRequestPending)
			proc_exit(1);
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
	}
}

PG_FUNCTION_INFO_V1(apikeys_flush);

/*
 * flush(timeout): asks this database's worker to write what is queued and
 * counted now, and waits until a flush that began after the call has
 * completed; false if that took longer than timeout.  Without the preload,
 * or on a standby, there is nothing to write.
 */
Datum
apikeys_flush(PG_FUNCTION_ARGS)
{
	Interval   *timeout = PG_GETARG_INTERVAL_P(0);
	int64		timeout_us;
	TimestampTz deadline;
	WorkerSlot *slot;
	uint32		start_id;
	uint64		started;
	pid_t		pid;
	Latch	   *launcher_latch;

	/* Months and days are checked first, so that no product or sum overflows. */
	if (timeout->month != 0 || timeout->day < -1 || timeout->day > 1 ||
		pg_add_s64_overflow(timeout->time, (int64) timeout->day * USECS_PER_DAY, &timeout_us) ||
		timeout_us < 0 || timeout_us > 3600 * USECS_PER_SEC)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("timeout must be between 0 and 1 hour")));
	if (registry == NULL || RecoveryInProgress())
		PG_RETURN_BOOL(true);
	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), timeout_us / 1000);

	LWLockAcquire(registry->lock, LW_EXCLUSIVE);
	if (find_slot(MyDatabaseId) == NULL && !want_worker(MyDatabaseId))
		registry->slots_were_full = true;
	slot = find_slot(MyDatabaseId);
	if (slot == NULL)
	{
		LWLockRelease(registry->lock);
		PG_RETURN_BOOL(false);	/* every slot is taken */
	}
	slot->flush_requested = true;
	slot->usage_requested = true;
	start_id = slot->start_id;
	started = slot->flushes_started;
	pid = slot->pid;
	launcher_latch = registry->launcher_latch;
	LWLockRelease(registry->lock);

	if (pid != 0)
	{
		PGPROC	   *proc = BackendPidGetProc(pid);

		if (proc != NULL)
			SetLatch(&proc->procLatch);
	}
	else if (launcher_latch != NULL)
		SetLatch(launcher_latch);

	for (;;)
	{
		bool		done;

		CHECK_FOR_INTERRUPTS();
		LWLockAcquire(registry->lock, LW_SHARED);
		slot = find_slot(MyDatabaseId);
		/* Freed: the worker wrote everything and left.  Restarted: its own flushes count. */
		done = slot == NULL ||
			(slot->start_id == start_id ? slot->flushes_done > started : slot->flushes_done > 0);
		LWLockRelease(registry->lock);
		if (done)
			PG_RETURN_BOOL(true);
		if (GetCurrentTimestamp() >= deadline)
			PG_RETURN_BOOL(false);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 20L,
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}
