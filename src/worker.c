/*
 * worker.c — one background worker per database, started on demand by the
 * backend that queues a record there while none runs.  Every
 * apikeys.flush_interval, and once more when asked to shut down, it moves
 * its database's records from shared memory into apikeys.audit_log.  It
 * exits (freeing its slot) when nothing is left to write or the extension is
 * gone from its database; the next record starts a new one, which also
 * covers restarts after a crash.  On a hot standby it writes nothing.
 */
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "shmem.h"
#include "usage.h"
#include "worker.h"

int			apikeys_flush_interval = 10;

#define FLUSH_BATCH 64
/* Keys whose counts one statement writes. */
#define USAGE_BATCH 1000

bool
apikeys_start_worker(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	strlcpy(worker.bgw_library_name, "apikeys", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "apikeys_worker_main", BGW_MAXLEN);
	snprintf(worker.bgw_name, BGW_MAXLEN, "apikeys worker for database %u", MyDatabaseId);
	strlcpy(worker.bgw_type, "apikeys worker", BGW_MAXLEN);
	worker.bgw_main_arg = ObjectIdGetDatum(MyDatabaseId);

	return RegisterDynamicBackgroundWorker(&worker, NULL);
}

static void
release_slot_at_exit(int code, Datum arg)
{
	apikeys_release_own_slot();
}

static const char *
event_name(int32 kind)
{
	switch (kind)
	{
		case EVENT_VERIFY_FAILED:
			return "verify_failed";
		case EVENT_LIMIT_EXCEEDED:
			return "limit_exceeded";
		case EVENT_USAGE_ALERT:
			return "usage_alert";
	}
	return "unknown";
}

static void
insert_record(const QueuedEvent *ev)
{
	static const char *sql =
	"INSERT INTO apikeys.audit_log (at, event, key_id, owner, actor, db_user, details) "
	"VALUES (pg_catalog.to_timestamp($1::float8 * 60), $2, $3, NULLIF($4, ''), NULLIF($5, ''), "
	"NULLIF($6, '')::name, $7::jsonb OPERATOR(pg_catalog.||) "
	"pg_catalog.jsonb_build_object('count', $8::bigint))";
	Oid			types[8] = {INT8OID, TEXTOID, UUIDOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, INT8OID};
	Datum		values[8];
	char		nulls[8] = {' ', ' ', ' ', ' ', ' ', ' ', ' ', ' '};
	static const pg_uuid_t no_key;

	values[0] = Int64GetDatum(ev->key.minute);
	values[1] = CStringGetTextDatum(event_name(ev->key.kind));
	if (memcmp(&ev->key.key_id, &no_key, sizeof(pg_uuid_t)) == 0)
		nulls[2] = 'n';
	else
		values[2] = UUIDPGetDatum(&ev->key.key_id);
	values[3] = CStringGetTextDatum(ev->owner);
	values[4] = CStringGetTextDatum(ev->actor);
	values[5] = CStringGetTextDatum(ev->db_user);
	values[6] = CStringGetTextDatum(ev->details);
	values[7] = Int64GetDatum(ev->count);

	if (SPI_execute_with_args(sql, 8, types, values, nulls, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "apikeys worker could not write an audit record");
}

/* An alert is also a notification, delivered when the flush commits. */
static void
notify_alert(const QueuedEvent *ev)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1];

	values[0] = CStringGetTextDatum(ev->details);
	if (SPI_execute_with_args("SELECT pg_catalog.pg_notify('apikeys_alert', $1)",
							  1, types, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "apikeys worker could not send an alert");
}

/* One batch of counts, as rows d(key_id, day, requests, failures, last_used_at). */
#define USAGE_ROWS \
	"ROWS FROM (pg_catalog.unnest($1::uuid[]), pg_catalog.unnest($2::int4[]), " \
	"  pg_catalog.unnest($3::int8[]), pg_catalog.unnest($4::int8[]), pg_catalog.unnest($5::timestamptz[])) " \
	"  AS d(key_id, day, requests, failures, last_used_at)"
#define USAGE_INSERT \
	"INSERT INTO apikeys.key_usage AS u (key_id, day, requests, failures, last_used_at) " \
	"SELECT d.key_id, DATE '1970-01-01' OPERATOR(pg_catalog.+) d.day, d.requests, d.failures, d.last_used_at " \
	"FROM " USAGE_ROWS

typedef enum UsageWrite
{
	USAGE_WRITE_INSERT,			/* rows known to be new */
	USAGE_WRITE_UPDATE,			/* rows known to exist */
	USAGE_WRITE_UPSERT			/* either */
} UsageWrite;

/*
 * Adds counts to apikeys.key_usage, a batch of keys per statement; returns
 * the rows written.  Every key counted exists: verify counts no key its own
 * transaction created, and keys are never deleted.  INSERT and UPDATE skip
 * what ON CONFLICT costs (a second index probe, a row lock) when the worker
 * knows whether a key's row for the day exists.
 */
static uint64
write_usage(const UsageDelta *deltas, int n, UsageWrite how)
{
	static const char *const sql[] = {
		[USAGE_WRITE_INSERT] = USAGE_INSERT,
		[USAGE_WRITE_UPDATE] =
		"UPDATE apikeys.key_usage AS u SET "
		"requests = u.requests OPERATOR(pg_catalog.+) d.requests, "
		"failures = u.failures OPERATOR(pg_catalog.+) d.failures, "
		"last_used_at = GREATEST(u.last_used_at, d.last_used_at) "
		"FROM " USAGE_ROWS " "
		"WHERE u.key_id OPERATOR(pg_catalog.=) d.key_id "
		"AND u.day OPERATOR(pg_catalog.=) (DATE '1970-01-01' OPERATOR(pg_catalog.+) d.day)",
		[USAGE_WRITE_UPSERT] = USAGE_INSERT
		" ON CONFLICT (key_id, day) DO UPDATE SET "
		"requests = u.requests OPERATOR(pg_catalog.+) EXCLUDED.requests, "
		"failures = u.failures OPERATOR(pg_catalog.+) EXCLUDED.failures, "
		"last_used_at = GREATEST(u.last_used_at, EXCLUDED.last_used_at)",
	};
	Oid			types[5] = {UUIDARRAYOID, INT4ARRAYOID, INT8ARRAYOID, INT8ARRAYOID, TIMESTAMPTZARRAYOID};
	Datum	   *ids = palloc(sizeof(Datum) * n);
	Datum	   *days = palloc(sizeof(Datum) * n);
	Datum	   *requests = palloc(sizeof(Datum) * n);
	Datum	   *failures = palloc(sizeof(Datum) * n);
	Datum	   *last_used = palloc(sizeof(Datum) * n);
	bool	   *last_used_null = palloc(sizeof(bool) * n);
	int			dims[1] = {n};
	int			lbs[1] = {1};
	Datum		values[5];
	int			ret;

	for (int i = 0; i < n; i++)
	{
		ids[i] = UUIDPGetDatum(&deltas[i].key_id);
		days[i] = Int32GetDatum(deltas[i].day);
		requests[i] = Int64GetDatum(deltas[i].requests);
		failures[i] = Int64GetDatum(deltas[i].failures);
		last_used[i] = TimestampTzGetDatum(deltas[i].last_used_at);
		last_used_null[i] = deltas[i].last_used_at == 0;
	}
	values[0] = PointerGetDatum(construct_array(ids, n, UUIDOID, UUID_LEN, false, TYPALIGN_CHAR));
	values[1] = PointerGetDatum(construct_array(days, n, INT4OID, 4, true, TYPALIGN_INT));
	values[2] = PointerGetDatum(construct_array(requests, n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	values[3] = PointerGetDatum(construct_array(failures, n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	values[4] = PointerGetDatum(construct_md_array(last_used, last_used_null, 1, dims, lbs,
												   TIMESTAMPTZOID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	ret = SPI_execute_with_args(sql[how], 5, types, values, NULL, false, 0);
	if (ret != (how == USAGE_WRITE_UPDATE ? SPI_OK_UPDATE : SPI_OK_INSERT))
		elog(ERROR, "apikeys worker could not write usage counts");
	return SPI_processed;
}

/*
 * Writes a batch the cheap way, as INSERT (no row today as far as this
 * server knows) or UPDATE (a flush wrote the row).  The worker can be wrong:
 * a row written before a restart, or added or deleted by hand.  Then the
 * batch is rolled back to its savepoint and upserted, and false returned.
 */
static bool
write_usage_fast(const UsageDelta *deltas, int n, bool rows_exist)
{
	volatile bool written = false;
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		written = write_usage(deltas, n, rows_exist ? USAGE_WRITE_UPDATE : USAGE_WRITE_INSERT) == (uint64) n;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		if (edata->sqlerrcode != ERRCODE_UNIQUE_VIOLATION)
		{
			RollbackAndReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(cxt);
			CurrentResourceOwner = owner;
			ReThrowError(edata);
		}
		FreeErrorData(edata);
	}
	PG_END_TRY();

	if (written)
		ReleaseCurrentSubTransaction();
	else
		RollbackAndReleaseCurrentSubTransaction();
	MemoryContextSwitchTo(cxt);
	CurrentResourceOwner = owner;
	if (!written)
		write_usage(deltas, n, USAGE_WRITE_UPSERT);
	return written;
}

/* Rows to update first, then by key: batches walk the primary key in order. */
static int
delta_cmp(const void *a, const void *b)
{
	const UsageDelta *x = a;
	const UsageDelta *y = b;
	int			c;

	if (x->row_exists != y->row_exists)
		return x->row_exists ? -1 : 1;
	c = memcmp(&x->key_id, &y->key_id, sizeof(pg_uuid_t));
	if (c != 0)
		return c;
	return (x->day > y->day) - (x->day < y->day);
}

/* Holds one flush's usage deltas. */
static MemoryContext deltas_cxt = NULL;

/* One flush; false when the extension is no longer installed here. */
static bool
flush_once(Oid dboid)
{
	QueuedEvent batch[FLUSH_BATCH];
	UsageDelta *deltas;
	TransactionId xid;
	bool		installed;
	bool		upsert_all;
	MemoryContext oldcxt;
	int			n;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "apikeys: flushing audit records and usage");

	SPI_execute("SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'apikeys'", true, 1);
	installed = SPI_processed > 0;

	while ((n = apikeys_dequeue(dboid, batch, FLUSH_BATCH)) > 0)
		for (int i = 0; installed && i < n; i++)
		{
			insert_record(&batch[i]);
			if (batch[i].key.kind == EVENT_USAGE_ALERT)
				notify_alert(&batch[i]);
		}

	/* Audit rows commit (and release the chain's lock) before usage takes row locks. */
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());

	xid = GetCurrentTransactionId();
	/* The deltas outlive the transaction: usage_flush_done() needs them after commit. */
	oldcxt = MemoryContextSwitchTo(deltas_cxt);
	n = usage_take_pending(dboid, xid, &deltas);
	MemoryContextSwitchTo(oldcxt);
	qsort(deltas, n, sizeof(UsageDelta), delta_cmp);
	upsert_all = false;
	for (int i = 0; installed && i < n;)
	{
		int			batch = Min(USAGE_BATCH, n - i);
		bool		existing = deltas[i].row_exists;

		/* A batch is all updates or all new rows. */
		for (int j = 1; j < batch; j++)
			if (deltas[i + j].row_exists != existing)
			{
				batch = j;
				break;
			}
		if (upsert_all)
			write_usage(deltas + i, batch, USAGE_WRITE_UPSERT);
		else
			upsert_all = !write_usage_fast(deltas + i, batch, existing);
		i += batch;
	}

	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	usage_flush_done(xid, deltas, n);
	MemoryContextReset(deltas_cxt);
	pgstat_report_activity(STATE_IDLE, NULL);
	return installed;
}

void
apikeys_worker_main(Datum main_arg)
{
	Oid			dboid = DatumGetObjectId(main_arg);

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnectionByOid(dboid, InvalidOid, 0);

	if (apikeys_shared == NULL || !apikeys_claim_slot(dboid))
		proc_exit(0);
	deltas_cxt = AllocSetContextCreate(TopMemoryContext, "apikeys usage deltas",
									   ALLOCSET_DEFAULT_SIZES);
	before_shmem_exit(release_slot_at_exit, (Datum) 0);

	/*
	 * Wait a flush interval, write, and leave once nothing is queued: an idle
	 * database keeps no worker connected (DROP DATABASE is not held up).
	 */
	for (;;)
	{
		TimestampTz since = GetCurrentTimestamp();

		for (;;)
		{
			/* Recomputed each time: a reload may have shortened the interval. */
			TimestampTz due = TimestampTzPlusMilliseconds(since, apikeys_flush_interval * 1000L);
			long		ms = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), due);

			if (ShutdownRequestPending || ms <= 0 || apikeys_take_flush_request(dboid))
				break;
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 ms, PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
			CHECK_FOR_INTERRUPTS();
			if (ConfigReloadPending)
			{
				ConfigReloadPending = false;
				ProcessConfigFile(PGC_SIGHUP);
			}
		}
		if (RecoveryInProgress())
			continue;
		if (!flush_once(dboid))
			proc_exit(0);
		if (ShutdownRequestPending)
		{
			/* What arrived during that flush goes too (bounded: backends are stopping). */
			for (int i = 0; i < 10 && apikeys_has_pending(dboid); i++)
				if (!flush_once(dboid))
					break;
			proc_exit(0);
		}
		if (apikeys_retire_if_idle(dboid))
			proc_exit(0);
	}
}
