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
#include "commands/async.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "shmem.h"
#include "usage.h"
#include "verify.h"
#include "worker.h"

int			apikeys_flush_interval = 10;

/* Audit records one transaction writes: it holds the chain's lock meanwhile. */
#define AUDIT_BATCH 100
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

/* Frees the worker's registry slot when it exits, however it exits. */
static void
release_slot_at_exit(int code, Datum arg)
{
	apikeys_release_own_slot();
}

/*
 * Settings every transaction of the worker runs with, whatever the
 * database, its owner or the configuration file set: names resolve in
 * pg_catalog first, and no timeout, isolation level, read-only default or
 * PL/pgSQL check a database owner can set makes every flush fail.
 */
static void
pin_settings(void)
{
	static const char *const pinned[][2] = {
		{"search_path", "pg_catalog, pg_temp"},
		{"statement_timeout", "0"},
		{"lock_timeout", "0"},
		{"idle_in_transaction_session_timeout", "0"},
		{"default_transaction_isolation", "read committed"},
		{"default_transaction_read_only", "off"},
		{"session_replication_role", "origin"},
		{"plpgsql.extra_errors", "none"},
	};

	for (size_t i = 0; i < lengthof(pinned); i++)
		SetConfigOption(pinned[i][0], pinned[i][1], PGC_SUSET, PGC_S_OVERRIDE);
}

/* The user and security context a flush transaction restores before it commits. */
static Oid	saved_userid;
static int	saved_sec_context;

/*
 * Starts a transaction whose statements run as apikeys_worker, the role
 * with just the privileges the worker needs, in a security-restricted
 * operation.  Returns false, with no transaction open, when the extension
 * is no longer installed in the database.
 */
static bool
begin_flush_xact(void)
{
	Oid			role;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	if (!OidIsValid(get_extension_oid("apikeys", true)))
	{
		CommitTransactionCommand();
		return false;
	}
	role = get_role_oid("apikeys_worker", false);
	GetUserIdAndSecContext(&saved_userid, &saved_sec_context);
	SetUserIdAndSecContext(role, saved_sec_context | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	PushActiveSnapshot(GetTransactionSnapshot());
	SPI_connect();
	return true;
}

/* Commits what begin_flush_xact() started. */
static void
commit_flush_xact(void)
{
	SPI_finish();
	PopActiveSnapshot();
	SetUserIdAndSecContext(saved_userid, saved_sec_context);
	CommitTransactionCommand();
}

/* The audit event a queued record becomes. */
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

/* The alert's JSON object: the NOTIFY payload, and the audit row's details but for the count. */
static void
append_alert_json(StringInfo out, const QueuedEvent *ev)
{
	appendStringInfo(out, "{\"key_id\": \"%s\", \"owner\": ",
					 DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(&ev->key.key_id))));
	escape_json(out, ev->key.owner);
	appendStringInfoString(out, ", \"start\": ");
	escape_json(out, ev->start);
	appendStringInfo(out, ", \"requests\": " INT64_FORMAT ", \"threshold\": %d}",
					 ev->requests, ev->threshold);
}

/* The details of the record's audit row, as JSON text. */
static char *
record_details(const QueuedEvent *ev)
{
	StringInfoData out;

	initStringInfo(&out);
	switch (ev->key.kind)
	{
		case EVENT_VERIFY_FAILED:
			appendStringInfo(&out, "{\"reason\": \"%s\"", verify_code_name(ev->key.reason));
			if (ev->key.overflow)
				appendStringInfoString(&out, ", \"overflow\": true");
			else if (ev->key.prefix[0] != '\0')
				appendStringInfo(&out, ", \"prefix\": \"%s\"", ev->key.prefix);	/* [a-z0-9_] */
			else if (ev->key.owner[0] == '\0')
				appendStringInfoString(&out, ", \"malformed\": true");
			break;
		case EVENT_LIMIT_EXCEEDED:
			appendStringInfoString(&out, "{\"plan\": ");
			escape_json(&out, ev->key.plan);
			appendStringInfo(&out, ", \"max_keys\": %d", ev->key.max_keys);
			break;
		case EVENT_USAGE_ALERT:
			append_alert_json(&out, ev);
			out.data[--out.len] = '\0';	/* reopen the object for the count */
			break;
	}
	appendStringInfo(&out, ", \"count\": " INT64_FORMAT "}", ev->count);
	return out.data;
}

/* Writes one queued record as an audit row (an alert also notifies at commit). */
static void
insert_record(const QueuedEvent *ev)
{
	static SPIPlanPtr plan = NULL;
	static const pg_uuid_t no_key;
	Datum		values[7];
	char		nulls[7] = {' ', ' ', ' ', ' ', ' ', ' ', ' '};
	/* The minute a record merges on, as a timestamp: its first second. */
	int64		unix_seconds = ev->key.minute * 60;

	if (plan == NULL)
	{
		Oid			types[7] = {TIMESTAMPTZOID, TEXTOID, UUIDOID, TEXTOID, TEXTOID, NAMEOID, JSONBOID};

		plan = SPI_prepare("INSERT INTO apikeys.audit_log (at, event, key_id, owner, actor, db_user, details) "
						   "VALUES ($1, $2, $3, $4, $5, $6, $7)", 7, types);
		if (plan == NULL || SPI_keepplan(plan) != 0)
			elog(ERROR, "apikeys worker could not prepare its audit insert");
	}

	values[0] = TimestampTzGetDatum((unix_seconds -
									 (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY) * USECS_PER_SEC);
	values[1] = CStringGetTextDatum(event_name(ev->key.kind));
	if (memcmp(&ev->key.key_id, &no_key, sizeof(pg_uuid_t)) == 0)
		nulls[2] = 'n';
	else
		values[2] = UUIDPGetDatum(&ev->key.key_id);
	if (ev->key.owner[0] == '\0')
		nulls[3] = 'n';
	else
		values[3] = CStringGetTextDatum(ev->key.owner);
	if (ev->actor[0] == '\0')
		nulls[4] = 'n';
	else
		values[4] = CStringGetTextDatum(ev->actor);
	if (ev->db_user[0] == '\0')
		nulls[5] = 'n';
	else
		values[5] = DirectFunctionCall1(namein, CStringGetDatum(ev->db_user));
	values[6] = DirectFunctionCall1(jsonb_in, CStringGetDatum(record_details(ev)));

	if (SPI_execute_plan(plan, values, nulls, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "apikeys worker could not write an audit record");

	if (ev->key.kind == EVENT_USAGE_ALERT)
	{
		StringInfoData payload;

		initStringInfo(&payload);
		append_alert_json(&payload, ev);
		Async_Notify("apikeys_alert", payload.data);
	}
}

/*
 * Writes the database's queued records, AUDIT_BATCH to a transaction, and
 * no more than were queued when it began, so a flood can neither keep one
 * transaction (and the audit chain's lock) open nor keep the flush going.
 * A batch whose write fails goes back to the queue before the error is
 * raised.  Returns false when the extension is gone from the database.
 */
static bool
flush_audit(Oid dboid)
{
	int			budget = apikeys_queued_for(dboid);
	QueuedEvent *batch = palloc(sizeof(QueuedEvent) * AUDIT_BATCH);
	bool		installed = true;

	while (budget > 0)
	{
		int			n = apikeys_dequeue(dboid, batch, Min(AUDIT_BATCH, budget));

		if (n == 0)
			break;
		budget -= n;
		if (!installed)
			continue;			/* the extension is gone: its records go with it */
		PG_TRY();
		{
			installed = begin_flush_xact();
			if (installed)
			{
				for (int i = 0; i < n; i++)
				{
					CHECK_FOR_INTERRUPTS();
					insert_record(&batch[i]);
				}
				commit_flush_xact();
			}
		}
		PG_CATCH();
		{
			apikeys_requeue(batch, n);
			PG_RE_THROW();
		}
		PG_END_TRY();
	}
	pfree(batch);
	return installed;
}

/* One batch of counts, as rows d(key_id, day, requests, failures, last_used_at). */
#define USAGE_ROWS \
	"ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), pg_catalog.unnest($3), " \
	"  pg_catalog.unnest($4), pg_catalog.unnest($5)) " \
	"  AS d(key_id, day, requests, failures, last_used_at)"
#define USAGE_INSERT \
	"INSERT INTO apikeys.key_usage AS u (key_id, day, requests, failures, last_used_at) " \
	"SELECT d.key_id, d.day, d.requests, d.failures, d.last_used_at " \
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
		"WHERE u.key_id OPERATOR(pg_catalog.=) d.key_id AND u.day OPERATOR(pg_catalog.=) d.day",
		[USAGE_WRITE_UPSERT] = USAGE_INSERT
		" ON CONFLICT (key_id, day) DO UPDATE SET "
		"requests = u.requests OPERATOR(pg_catalog.+) EXCLUDED.requests, "
		"failures = u.failures OPERATOR(pg_catalog.+) EXCLUDED.failures, "
		"last_used_at = GREATEST(u.last_used_at, EXCLUDED.last_used_at)",
	};
	Oid			types[5] = {UUIDARRAYOID, DATEARRAYOID, INT8ARRAYOID, INT8ARRAYOID, TIMESTAMPTZARRAYOID};
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
		days[i] = DateADTGetDatum(deltas[i].day - (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE));
		requests[i] = Int64GetDatum(deltas[i].requests);
		failures[i] = Int64GetDatum(deltas[i].failures);
		last_used[i] = TimestampTzGetDatum(deltas[i].last_used_at);
		last_used_null[i] = deltas[i].last_used_at == 0;
	}
	values[0] = PointerGetDatum(construct_array(ids, n, UUIDOID, UUID_LEN, false, TYPALIGN_CHAR));
	values[1] = PointerGetDatum(construct_array(days, n, DATEOID, sizeof(DateADT), true, TYPALIGN_INT));
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

/*
 * Writes the database's usage counts in one transaction, or forgets them
 * when the extension is gone.  If the transaction fails, the next flush
 * takes its counts again (see usage_take_pending()).
 */
static void
flush_usage(Oid dboid, bool installed)
{
	UsageDelta *deltas;
	TransactionId xid;
	bool		upsert_all = false;
	MemoryContext oldcxt;
	int			n;

	if (!installed || !begin_flush_xact())
	{
		installed = false;
		StartTransactionCommand();
	}
	xid = GetCurrentTransactionId();
	/* The deltas outlive the transaction: usage_flush_done() needs them after commit. */
	oldcxt = MemoryContextSwitchTo(deltas_cxt);
	n = usage_take_pending(dboid, xid, &deltas);
	MemoryContextSwitchTo(oldcxt);
	qsort(deltas, n, sizeof(UsageDelta), delta_cmp);
	for (int i = 0; installed && i < n;)
	{
		int			batch = Min(USAGE_BATCH, n - i);
		bool		existing = deltas[i].row_exists;

		CHECK_FOR_INTERRUPTS();
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
	if (installed)
		commit_flush_xact();
	else
		CommitTransactionCommand();
	usage_flush_done(xid, deltas, n);
	MemoryContextReset(deltas_cxt);
}

/* One flush; false when the extension is no longer installed here. */
static bool
flush_once(Oid dboid)
{
	bool		installed;

	pgstat_report_activity(STATE_RUNNING, "apikeys: flushing audit records and usage");
	/* Audit rows commit (and release the chain's lock) before usage takes row locks. */
	installed = flush_audit(dboid);
	flush_usage(dboid, installed);
	pgstat_report_activity(STATE_IDLE, NULL);
	return installed;
}

/*
 * A flush that reports its error instead of ending the worker: what it had
 * taken is back in shared memory (see flush_audit() and flush_usage()),
 * and the next interval tries again.  Returns false when the extension is
 * no longer installed here.
 */
static bool
flush_or_report(Oid dboid)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool installed = true;

	PG_TRY();
	{
		installed = flush_once(dboid);
	}
	PG_CATCH();
	{
		HOLD_INTERRUPTS();
		MemoryContextSwitchTo(cxt);
		EmitErrorReport();
		AbortCurrentTransaction();
		FlushErrorState();
		MemoryContextReset(deltas_cxt);
		pgstat_report_activity(STATE_IDLE, NULL);
		RESUME_INTERRUPTS();
	}
	PG_END_TRY();
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
	pin_settings();

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
		if (!flush_or_report(dboid))
			proc_exit(0);
		if (ShutdownRequestPending)
		{
			/* What arrived during that flush goes too (bounded: backends are stopping). */
			for (int i = 0; i < 10 && apikeys_has_pending(dboid); i++)
				if (!flush_or_report(dboid))
					break;
			proc_exit(0);
		}
		if (apikeys_retire_if_idle(dboid))
			proc_exit(0);
	}
}
