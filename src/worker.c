/*
 * worker.c — the background worker of one database, started by the
 * launcher while the database has something to write.  Every
 * apikeys.flush_interval it moves the database's queued records from
 * shared memory into apikeys.audit_log; every apikeys.usage_flush_interval
 * it adds the usage counts to apikeys.key_usage (sooner when no client is
 * connected to the database, so that an idle database keeps no worker);
 * and it writes both once more when asked to stop.  It exits when nothing
 * is left to write, or when the extension is gone from its database.
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/heapam.h"
#include "catalog/index.h"
#include "catalog/namespace.h"
#include "commands/async.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "nodes/makefuncs.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/bufmgr.h"
#include "storage/ipc.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/fmgroids.h"
#include "utils/json.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "credits.h"
#include "launcher.h"
#include "queue.h"
#include "usage.h"
#include "verify.h"
#include "worker.h"

/* GUC apikeys.flush_interval, in seconds: how often queued audit records are written. */
static int	flush_interval = 10;
/* GUC apikeys.usage_flush_interval, in seconds: how often usage counts are written. */
static int	usage_flush_interval = 60;

/* Audit records one transaction writes: it holds the chain's lock meanwhile. */
#define AUDIT_BATCH 100
/* Keys whose counts one statement writes. */
#define USAGE_BATCH 1000

/*
 * Settings every transaction of the worker runs with, whatever the
 * database, its owner or the configuration file set: names resolve in
 * pg_catalog first; no timeout, isolation level, read-only default,
 * string syntax or PL/pgSQL check a database owner can set makes every
 * flush fail; and exit_on_error cannot turn a failed flush, whose records
 * go back to the queue, into an exit that loses them.
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
		{"standard_conforming_strings", "on"},
		{"exit_on_error", "off"},
	};

	for (size_t i = 0; i < lengthof(pinned); i++)
		SetConfigOption(pinned[i][0], pinned[i][1], PGC_SUSET, PGC_S_OVERRIDE);
}

/* Holds one flush's audit batch and usage deltas; reset after each flush and on error. */
static MemoryContext deltas_cxt = NULL;

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

/* How long an audit flush waits for the audit chain's lock before it leaves the records queued. */
#define AUDIT_LOCK_TIMEOUT "1s"

/* Set by flush_audit() when another session held the audit chain's lock. */
static bool audit_chain_busy = false;
/* Whether the log already says so for the present spell. */
static bool chain_busy_reported = false;

/*
 * Writes the database's queued records, AUDIT_BATCH to a transaction, and
 * no more than were queued when it began, so a flood can neither keep one
 * transaction (and the audit chain's lock) open nor keep the flush going.
 * A batch whose write fails goes back to the queue before the error is
 * raised; so does one that waits more than AUDIT_LOCK_TIMEOUT for the
 * chain's lock, without an error: a session left open after changing a key
 * (which holds that lock) holds up the audit records, but not the counts
 * and spending written after them.  Returns false when the extension is
 * gone from the database.
 */
static bool
flush_audit(Oid dboid)
{
	int			budget = queue_count(dboid);

	/* In the flush's context, which an error resets: a failed flush leaks nothing. */
	QueuedEvent *batch = MemoryContextAlloc(deltas_cxt, sizeof(QueuedEvent) * AUDIT_BATCH);
	bool		installed = true;
	MemoryContext cxt = CurrentMemoryContext;

	audit_chain_busy = false;
	while (budget > 0 && !audit_chain_busy)
	{
		int			n = queue_take(dboid, batch, Min(AUDIT_BATCH, budget));

		if (n == 0)
			break;
		budget -= n;
		if (!installed)
		{
			/* The extension is gone: its records go with it, counted as lost. */
			queue_note_lost(batch, n);
			continue;
		}
		PG_TRY();
		{
			installed = begin_flush_xact();
			if (!installed)
				queue_note_lost(batch, n);
			else
			{
				(void) set_config_option("lock_timeout", AUDIT_LOCK_TIMEOUT, PGC_SUSET, PGC_S_SESSION,
										 GUC_ACTION_LOCAL, true, 0, false);
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
			queue_put_back(batch, n);
			if (geterrcode() != ERRCODE_LOCK_NOT_AVAILABLE)
				PG_RE_THROW();
			HOLD_INTERRUPTS();
			MemoryContextSwitchTo(cxt);
			FlushErrorState();
			AbortCurrentTransaction();
			RESUME_INTERRUPTS();
			audit_chain_busy = true;
		}
		PG_END_TRY();
	}
	/* Once a spell, not every interval it lasts. */
	if (audit_chain_busy && !chain_busy_reported)
		ereport(LOG,
				(errmsg("apikeys worker: another session holds a lock the audit records need; they stay queued"),
				 errdetail("Most likely a transaction that changed a key is still open and holds the audit chain's lock. Counts and spent credits are written meanwhile.")));
	chain_busy_reported = audit_chain_busy;
	pfree(batch);
	return installed;
}

/*
 * Adds one batch of counts to apikeys.key_usage in one statement: rows that
 * exist are updated; the rest (a key's first counts of the day here) are
 * inserted.  Every key counted exists: verify counts no key its own
 * transaction created, and keys are never deleted.  No savepoint and no
 * guess about which rows exist, so a restart or a row deleted by hand costs
 * nothing; ON CONFLICT only guards against a row inserted by hand meanwhile.
 */
static void
write_usage(const UsageDelta *deltas, int n)
{
	static SPIPlanPtr plan = NULL;
	Datum	   *ids = palloc(sizeof(Datum) * n);
	Datum	   *days = palloc(sizeof(Datum) * n);
	Datum	   *requests = palloc(sizeof(Datum) * n);
	Datum	   *failures = palloc(sizeof(Datum) * n);
	Datum	   *last_used = palloc(sizeof(Datum) * n);
	bool	   *last_used_null = palloc(sizeof(bool) * n);
	int			dims[1] = {n};
	int			lbs[1] = {1};
	Datum		values[5];

	if (plan == NULL)
	{
		Oid			types[5] = {UUIDARRAYOID, DATEARRAYOID, INT8ARRAYOID, INT8ARRAYOID,
		TIMESTAMPTZARRAYOID};

		plan = SPI_prepare(
						   "WITH d AS (SELECT * FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), "
						   "    pg_catalog.unnest($3), pg_catalog.unnest($4), pg_catalog.unnest($5)) "
						   "    AS d(key_id, day, requests, failures, last_used_at)), "
						   "updated AS ("
						   "  UPDATE apikeys.key_usage AS u SET "
						   "    requests = u.requests OPERATOR(pg_catalog.+) d.requests, "
						   "    failures = u.failures OPERATOR(pg_catalog.+) d.failures, "
						   "    last_used_at = GREATEST(u.last_used_at, d.last_used_at) "
						   "  FROM d WHERE u.key_id OPERATOR(pg_catalog.=) d.key_id "
						   "    AND u.day OPERATOR(pg_catalog.=) d.day "
						   "  RETURNING u.key_id, u.day) "
						   "INSERT INTO apikeys.key_usage AS u (key_id, day, requests, failures, last_used_at) "
						   "SELECT d.key_id, d.day, d.requests, d.failures, d.last_used_at FROM d "
						   "WHERE NOT EXISTS (SELECT FROM updated x WHERE x.key_id OPERATOR(pg_catalog.=) d.key_id "
						   "                  AND x.day OPERATOR(pg_catalog.=) d.day) "
						   "ON CONFLICT (key_id, day) DO UPDATE SET "
						   "  requests = u.requests OPERATOR(pg_catalog.+) EXCLUDED.requests, "
						   "  failures = u.failures OPERATOR(pg_catalog.+) EXCLUDED.failures, "
						   "  last_used_at = GREATEST(u.last_used_at, EXCLUDED.last_used_at)",
						   5, types);
		if (plan == NULL || SPI_keepplan(plan) != 0)
			elog(ERROR, "apikeys worker could not prepare its usage write");
	}

	for (int i = 0; i < n; i++)
	{
		ids[i] = UUIDPGetDatum(&deltas[i].key_id);
		days[i] = DateADTGetDatum(deltas[i].day - (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE));
		requests[i] = Int64GetDatum(deltas[i].counts.requests);
		failures[i] = Int64GetDatum(deltas[i].counts.failures);
		last_used[i] = TimestampTzGetDatum(deltas[i].counts.last_used_at);
		last_used_null[i] = deltas[i].counts.last_used_at == 0;
	}
	values[0] = PointerGetDatum(construct_array(ids, n, UUIDOID, UUID_LEN, false, TYPALIGN_CHAR));
	values[1] = PointerGetDatum(construct_array(days, n, DATEOID, sizeof(DateADT), true, TYPALIGN_INT));
	values[2] = PointerGetDatum(construct_array(requests, n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	values[3] = PointerGetDatum(construct_array(failures, n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	values[4] = PointerGetDatum(construct_md_array(last_used, last_used_null, 1, dims, lbs,
												   TIMESTAMPTZOID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	if (SPI_execute_plan(plan, values, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "apikeys worker could not write usage counts");
}

/* The columns of apikeys.key_usage, as the install script creates it. */
#define USAGE_ATT_KEY_ID		1
#define USAGE_ATT_DAY			2
#define USAGE_ATT_REQUESTS		3
#define USAGE_ATT_FAILURES		4
#define USAGE_ATT_LAST_USED_AT	5
#define USAGE_NATTS				5

/*
 * Whether the worker's role holds each of SELECT, INSERT and UPDATE on
 * key_usage (pg_class_aclcheck() with all three passes if it holds any one).
 */
static bool
has_usage_privileges(Oid relid)
{
	static const AclMode modes[] = {ACL_SELECT, ACL_INSERT, ACL_UPDATE};

	for (size_t i = 0; i < lengthof(modes); i++)
		if (pg_class_aclcheck(relid, GetUserId(), modes[i]) != ACLCHECK_OK)
			return false;
	return true;
}

/*
 * Whether key_usage is as the extension made it, so that counts may be
 * written through the table and index access methods rather than SQL: its
 * columns, its primary key as its only index, no trigger, rule or CHECK
 * constraint, no row security, and the privileges SQL would check.  If a
 * DBA added any of these, batches go through SQL so that they apply.
 * Returns the primary key (opened) or NULL.
 */
static Relation
usage_direct_index(Relation rel)
{
	TupleDesc	desc = RelationGetDescr(rel);
	static const Oid types[USAGE_NATTS] = {UUIDOID, DATEOID, INT8OID, INT8OID, TIMESTAMPTZOID};
	List	   *indexes;
	Relation	index;

	if (desc->natts != USAGE_NATTS || rel->trigdesc != NULL || rel->rd_rules != NULL ||
		rel->rd_rel->relrowsecurity || rel->rd_rel->relkind != RELKIND_RELATION ||
		(desc->constr != NULL && desc->constr->num_check > 0) ||
		!has_usage_privileges(RelationGetRelid(rel)))
		return NULL;
	for (int i = 0; i < USAGE_NATTS; i++)
		if (TupleDescAttr(desc, i)->atttypid != types[i] || TupleDescAttr(desc, i)->attisdropped)
			return NULL;
	indexes = RelationGetIndexList(rel);
	if (list_length(indexes) != 1)
		return NULL;
	index = index_open(linitial_oid(indexes), RowExclusiveLock);
	if (!index->rd_index->indisprimary || index->rd_index->indnatts != 2 ||
		index->rd_index->indkey.values[0] != USAGE_ATT_KEY_ID ||
		index->rd_index->indkey.values[1] != USAGE_ATT_DAY ||
		RelationGetIndexExpressions(index) != NIL || RelationGetIndexPredicate(index) != NIL)
	{
		index_close(index, RowExclusiveLock);
		return NULL;
	}
	return index;
}

/*
 * The block of the delta's hint, or InvalidBlockNumber when it has none or
 * the hint is past the table's end (nblocks: its length, which cannot shrink
 * while the flush's lock is held).
 */
static inline BlockNumber
hinted_block(const UsageDelta *d, BlockNumber nblocks)
{
	if (!ItemPointerIsValid(&d->row) || ItemPointerGetBlockNumber(&d->row) >= nblocks)
		return InvalidBlockNumber;
	return ItemPointerGetBlockNumber(&d->row);
}

/*
 * Prunes a page a hint leads to, as an index scan reading it would: the
 * hinted fetch reads no index, and without pruning the page fills with the
 * versions earlier flushes left, so that updates stop being HOT (and add
 * index entries) until VACUUM comes.  Pruning takes the page only if no one
 * else holds it, so the slot lets go of its pin first.
 */
static void
prune_hinted_page(Relation rel, BlockNumber block, TupleTableSlot *slot)
{
	Buffer		buffer;

	ExecClearTuple(slot);
	buffer = ReadBuffer(rel, block);
	heap_page_prune_opt(rel, buffer);
	ReleaseBuffer(buffer);
}

/*
 * Whether the row at the delta's (usable) hint is the key's row for its day
 * as the snapshot sees it; if so, the slot holds it.  The hint is where the
 * previous flush wrote that row, and may be stale: a row updated or deleted
 * by hand since, or a slot VACUUM freed and another row took.
 */
static bool
fetch_hinted_row(Relation rel, Snapshot snapshot, const UsageDelta *d, Datum day,
				 TupleTableSlot *slot)
{
	ItemPointerData row = d->row;
	bool		isnull;

	if (!table_tuple_fetch_row_version(rel, &row, snapshot, slot))
		return false;
	return memcmp(DatumGetUUIDP(slot_getattr(slot, USAGE_ATT_KEY_ID, &isnull)), &d->key_id,
				  sizeof(pg_uuid_t)) == 0 &&
		DatumGetDateADT(slot_getattr(slot, USAGE_ATT_DAY, &isnull)) == DatumGetDateADT(day);
}

/*
 * Adds counts to apikeys.key_usage through the heap and index access
 * methods: the key's row, where the previous flush wrote it or else by a
 * probe of the primary key, then an update of it (HOT when the page has
 * room, so no index entry is added) or, for a key's first counts of the
 * day, an insert.  This is what the SQL of write_usage() does, without
 * planning and executing a statement per batch.  Each delta's row is set
 * to where its row now is.  The worker is the only writer of the table; a
 * row inserted by hand meanwhile makes the insert fail, and the flush is
 * retried.
 */
static void
write_usage_direct(Relation rel, Relation index, UsageDelta *deltas, int n)
{
	TupleDesc	desc = RelationGetDescr(rel);
	IndexInfo  *info = BuildIndexInfo(index);
	Snapshot	snapshot = RegisterSnapshot(GetLatestSnapshot());
	IndexScanDesc scan = index_beginscan(rel, index, snapshot, 2, 0);
	TupleTableSlot *slot = table_slot_create(rel, NULL);
	BlockNumber nblocks = RelationGetNumberOfBlocks(rel);
	BlockNumber pruned = InvalidBlockNumber;
	ScanKeyData skeys[2];

	for (int i = 0; i < n; i++)
	{
		UsageDelta *d = &deltas[i];
		Datum		values[USAGE_NATTS];
		bool		nulls[USAGE_NATTS] = {false};
		Datum		key[2];
		bool		key_nulls[2] = {false, false};
		HeapTuple	tuple;
		BlockNumber block;
		bool		found;

		CHECK_FOR_INTERRUPTS();
		key[0] = UUIDPGetDatum(&d->key_id);
		key[1] = DateADTGetDatum(d->day - (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE));
		block = hinted_block(d, nblocks);
		/* Hinted rows come in the table's order: each page is pruned once. */
		if (block != InvalidBlockNumber && block != pruned)
		{
			prune_hinted_page(rel, block, slot);
			pruned = block;
		}
		found = block != InvalidBlockNumber && fetch_hinted_row(rel, snapshot, d, key[1], slot);
		if (!found)
		{
			ScanKeyInit(&skeys[0], 1, BTEqualStrategyNumber, F_UUID_EQ, key[0]);
			ScanKeyInit(&skeys[1], 2, BTEqualStrategyNumber, F_DATE_EQ, key[1]);
			index_rescan(scan, skeys, 2, NULL, 0);
			found = index_getnext_slot(scan, ForwardScanDirection, slot);
		}

		values[USAGE_ATT_KEY_ID - 1] = key[0];
		values[USAGE_ATT_DAY - 1] = key[1];
		values[USAGE_ATT_REQUESTS - 1] = Int64GetDatum(d->counts.requests);
		values[USAGE_ATT_FAILURES - 1] = Int64GetDatum(d->counts.failures);
		values[USAGE_ATT_LAST_USED_AT - 1] = TimestampTzGetDatum(d->counts.last_used_at);
		nulls[USAGE_ATT_LAST_USED_AT - 1] = d->counts.last_used_at == 0;
		if (found)
		{
			bool		isnull;
			Datum		old_last_used;

			values[USAGE_ATT_REQUESTS - 1] = Int64GetDatum(d->counts.requests +
														   DatumGetInt64(slot_getattr(slot, USAGE_ATT_REQUESTS, &isnull)));
			values[USAGE_ATT_FAILURES - 1] = Int64GetDatum(d->counts.failures +
														   DatumGetInt64(slot_getattr(slot, USAGE_ATT_FAILURES, &isnull)));
			old_last_used = slot_getattr(slot, USAGE_ATT_LAST_USED_AT, &isnull);
			if (!isnull && (nulls[USAGE_ATT_LAST_USED_AT - 1] ||
							DatumGetTimestampTz(old_last_used) > d->counts.last_used_at))
			{
				values[USAGE_ATT_LAST_USED_AT - 1] = old_last_used;
				nulls[USAGE_ATT_LAST_USED_AT - 1] = false;
			}
			tuple = heap_form_tuple(desc, values, nulls);
			simple_heap_update(rel, &slot->tts_tid, tuple);
			if (!HeapTupleIsHeapOnly(tuple))
				index_insert(index, key, key_nulls, &tuple->t_self, rel, UNIQUE_CHECK_YES, false, info);
		}
		else
		{
			tuple = heap_form_tuple(desc, values, nulls);
			simple_heap_insert(rel, tuple);
			index_insert(index, key, key_nulls, &tuple->t_self, rel, UNIQUE_CHECK_YES, false, info);
		}
		d->row = tuple->t_self;
		heap_freetuple(tuple);
	}

	index_endscan(scan);
	ExecDropSingleTupleTableSlot(slot);
	UnregisterSnapshot(snapshot);
	CommandCounterIncrement();
}

/* By key id (bsearch over the keys a credits write listed). */
static int
key_id_cmp(const void *a, const void *b)
{
	return memcmp(a, b, sizeof(pg_uuid_t));
}

/* Marks written the deltas whose key the last SPI result lists in its first column. */
static void
mark_listed_written(CreditDelta *deltas, int n)
{
	uint64		n_listed = SPI_processed;
	pg_uuid_t  *listed = palloc(sizeof(pg_uuid_t) * Max(n_listed, 1));

	for (uint64 i = 0; i < n_listed; i++)
	{
		bool		isnull;

		memcpy(&listed[i], DatumGetUUIDP(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc,
													   1, &isnull)), sizeof(pg_uuid_t));
	}
	qsort(listed, n_listed, sizeof(pg_uuid_t), key_id_cmp);
	for (int i = 0; i < n; i++)
		if (!deltas[i].written)
			deltas[i].written = bsearch(&deltas[i].key_id, listed, n_listed, sizeof(pg_uuid_t),
										key_id_cmp) != NULL;
	pfree(listed);
}

/*
 * Marks written the unwritten deltas whose key is gone: their spending has
 * nowhere to go.  Only a batch with rows left unlocked pays for this probe.
 */
static void
mark_gone_keys(CreditDelta *deltas, int n)
{
	static SPIPlanPtr plan = NULL;
	Datum	   *ids = palloc(sizeof(Datum) * n);
	int			n_unwritten = 0;
	Datum		values[1];

	if (plan == NULL)
	{
		Oid			types[1] = {UUIDARRAYOID};

		plan = SPI_prepare("SELECT u.id FROM pg_catalog.unnest($1) AS u(id) WHERE NOT EXISTS "
						   "  (SELECT FROM apikeys.keys k WHERE k.id OPERATOR(pg_catalog.=) u.id)",
						   1, types);
		if (plan == NULL || SPI_keepplan(plan) != 0)
			elog(ERROR, "apikeys worker could not prepare its look-up of deleted keys");
	}
	for (int i = 0; i < n; i++)
		if (!deltas[i].written)
			ids[n_unwritten++] = UUIDPGetDatum(&deltas[i].key_id);
	values[0] = PointerGetDatum(construct_array(ids, n_unwritten, UUIDOID, UUID_LEN, false,
												TYPALIGN_CHAR));
	/*
	 * Not read-only: a snapshot taken now, after the write, so that a key
	 * committed since the flush began (with spending already taken) is not
	 * mistaken for a deleted one.
	 */
	if (SPI_execute_plan(plan, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "apikeys worker could not look up deleted keys");
	mark_listed_written(deltas, n);
}

/*
 * Subtracts what verify spent from apikeys.keys.credits, in one statement
 * per batch (and a second for a batch with rows left unlocked), and marks
 * the deltas it wrote (or that need no writing).  Rows another transaction has
 * locked (an admin's update_key, say) are skipped, not waited for: their
 * spending goes back to shared memory for the next flush, so the worker
 * never waits for, or deadlocks with, a session.  The subtraction is
 * relative, so it commutes with add_credits; never below zero.  A balance
 * whose refill period has passed is read as its refill amount first;
 * spending of a period the row has already left is not written (the
 * refill replaced it).  apikeys.audit_context (settable only as a
 * superuser) tells the table's triggers that this is the worker: the
 * update is neither audited nor a new generation.  Both steps join the
 * batch to the table through its primary key, key by key: a generic plan
 * of the earlier form (k.id = ANY (the locked ids)) joined the batch to
 * itself, quadratic in its size (133 ms a batch of 1,000 keys, against 27).
 */
static void
write_credits(CreditDelta *deltas, int n)
{
	static SPIPlanPtr plan = NULL;
	Datum	   *ids = palloc(sizeof(Datum) * n);
	Datum	   *spent = palloc(sizeof(Datum) * n);
	Datum	   *refills = palloc(sizeof(Datum) * n);
	bool	   *refill_nulls = palloc(sizeof(bool) * n);
	Datum	   *periods = palloc(sizeof(Datum) * n);
	int			dims[1] = {n};
	int			lbs[1] = {1};
	Datum		values[4];
	uint64		n_locked;

	if (plan == NULL)
	{
		Oid			types[4] = {UUIDARRAYOID, INT8ARRAYOID, TEXTARRAYOID, INT4ARRAYOID};

		plan = SPI_prepare(
						   "WITH d AS (SELECT * FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), "
						   "    pg_catalog.unnest($3), pg_catalog.unnest($4)) AS d(key_id, spent, refill, period)), "
						   "locked AS (SELECT k.id, d.spent, d.refill, d.period "
						   "    FROM d JOIN apikeys.keys k ON k.id OPERATOR(pg_catalog.=) d.key_id "
						   "    FOR NO KEY UPDATE OF k SKIP LOCKED), "
						   "written AS (UPDATE apikeys.keys AS k SET "
						   "  credits = pg_catalog.int8larger(CASE WHEN k.credits_refill_amount IS NOT NULL "
						   "      AND k.credits_period OPERATOR(pg_catalog.<) l.period "
						   "    THEN k.credits_refill_amount ELSE k.credits END "
						   "    OPERATOR(pg_catalog.-) l.spent, 0), "
						   "  credits_period = l.period "
						   "  FROM locked l WHERE k.id OPERATOR(pg_catalog.=) l.id "
						   "    AND k.credits IS NOT NULL "
						   "    AND ((k.credits_refill_interval IS NULL AND l.refill IS NULL) "
						   "         OR k.credits_refill_interval OPERATOR(pg_catalog.=) l.refill) "
						   "    AND k.credits_period OPERATOR(pg_catalog.<=) l.period "
						   "  RETURNING k.id) "
						   "SELECT l.id FROM locked l",
						   4, types);
		if (plan == NULL || SPI_keepplan(plan) != 0)
			elog(ERROR, "apikeys worker could not prepare its credits write");
	}
	for (int i = 0; i < n; i++)
	{
		ids[i] = UUIDPGetDatum(&deltas[i].key_id);
		spent[i] = Int64GetDatum(deltas[i].spent);
		refill_nulls[i] = deltas[i].refill == REFILL_NONE;
		refills[i] = CStringGetTextDatum(deltas[i].refill == REFILL_DAY ? "day" : "month");
		periods[i] = Int32GetDatum(deltas[i].period);
	}
	values[0] = PointerGetDatum(construct_array(ids, n, UUIDOID, UUID_LEN, false, TYPALIGN_CHAR));
	values[1] = PointerGetDatum(construct_array(spent, n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	values[2] = PointerGetDatum(construct_md_array(refills, refill_nulls, 1, dims, lbs,
												   TEXTOID, -1, false, TYPALIGN_INT));
	values[3] = PointerGetDatum(construct_array(periods, n, INT4OID, 4, true, TYPALIGN_INT));
	/*
	 * The keys triggers guard and audit what people change; run per row in
	 * PL/pgSQL they doubled the cost of this write (20,000 rows: 1.6 s with
	 * them, 0.8 s without).  So they do not fire for it
	 * (session_replication_role = replica, this statement only); a trigger
	 * a DBA made ENABLE ALWAYS still does, and apikeys.audit_context tells
	 * the extension's own that it is the worker.
	 */
	(void) set_config_option("apikeys.audit_context", "credits_flush", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
	(void) set_config_option("session_replication_role", "replica", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
	if (SPI_execute_plan(plan, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "apikeys worker could not write spent credits");
	(void) set_config_option("session_replication_role", "origin", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
	(void) set_config_option("apikeys.audit_context", "", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);

	/*
	 * A locked row was written, or needs nothing (no credit limit, a refill
	 * since, or another refill than the spending was made under, which the
	 * change that set it accounted for); so does a key that is gone.
	 * Deltas come from credits_take_pending() unwritten.
	 */
	n_locked = SPI_processed;
	mark_listed_written(deltas, n);
	if (n_locked < (uint64) n)
		mark_gone_keys(deltas, n);
}

/*
 * Rows with a hint first, in the table's order, so that each page is read
 * once; then the rest by key and day, so that their probes (and each SQL
 * batch) walk the primary key in order.
 */
static inline int
delta_cmp(const UsageDelta *x, const UsageDelta *y)
{
	bool		x_hinted = ItemPointerIsValid(&x->row);
	bool		y_hinted = ItemPointerIsValid(&y->row);
	int			c;

	if (x_hinted != y_hinted)
		return x_hinted ? -1 : 1;
	if (x_hinted)
	{
		BlockNumber xb = ItemPointerGetBlockNumberNoCheck(&x->row);
		BlockNumber yb = ItemPointerGetBlockNumberNoCheck(&y->row);

		if (xb != yb)
			return xb < yb ? -1 : 1;
		return (int) ItemPointerGetOffsetNumberNoCheck(&x->row) -
			(int) ItemPointerGetOffsetNumberNoCheck(&y->row);
	}
	c = memcmp(&x->key_id, &y->key_id, sizeof(pg_uuid_t));
	if (c != 0)
		return c;
	return (x->day > y->day) - (x->day < y->day);
}

/*
 * sort_deltas(): a quicksort with delta_cmp inlined, which takes about a
 * third of qsort()'s time on the hundreds of thousands of deltas of a busy
 * minute.
 */
#define ST_SORT sort_deltas
#define ST_ELEMENT_TYPE UsageDelta
#define ST_COMPARE(a, b) delta_cmp(a, b)
#define ST_SCOPE static
#define ST_DEFINE
#include "lib/sort_template.h"

/*
 * The OID of apikeys.keys, whose rows the spending is of (InvalidOid if it
 * is missing), locked so that it stays the table this flush writes.
 */
static Oid
keys_relid(void)
{
	return RangeVarGetRelid(makeRangeVar("apikeys", "keys", -1), AccessShareLock, true);
}

/*
 * Writes the database's usage counts in one transaction, or forgets them
 * when the extension is gone.  If the transaction fails, the next flush
 * takes its counts again (see usage_take_pending()).
 */
static void
flush_usage(Oid dboid, bool installed)
{
	UsageDelta *deltas;
	CreditDelta *credits;
	TransactionId xid;
	MemoryContext oldcxt;
	int			n;
	int			n_credits;
	Oid			keys;
	TimestampTz began = GetCurrentTimestamp();

	if (!installed || !begin_flush_xact())
	{
		installed = false;
		StartTransactionCommand();
	}
	xid = GetCurrentTransactionId();
	keys = installed ? keys_relid() : InvalidOid;
	/* The deltas outlive the transaction: usage_flush_done() needs them after commit. */
	oldcxt = MemoryContextSwitchTo(deltas_cxt);
	n = usage_take_pending(dboid, xid, &deltas);
	n_credits = credits_take_pending(dboid, keys, xid, &credits);
	MemoryContextSwitchTo(oldcxt);
	sort_deltas(deltas, n);
	if (installed && n > 0)
	{
		Relation	rel = table_open(RangeVarGetRelid(makeRangeVar("apikeys", "key_usage", -1),
													  RowExclusiveLock, false), RowExclusiveLock);
		Relation	index = usage_direct_index(rel);

		if (index != NULL)
		{
			write_usage_direct(rel, index, deltas, n);
			index_close(index, NoLock);
		}
		else
			for (int i = 0; i < n; i += USAGE_BATCH)
			{
				CHECK_FOR_INTERRUPTS();
				write_usage(deltas + i, Min(USAGE_BATCH, n - i));
			}
		table_close(rel, NoLock);
	}
	for (int i = 0; installed && i < n_credits; i += USAGE_BATCH)
	{
		CHECK_FOR_INTERRUPTS();
		write_credits(credits + i, Min(USAGE_BATCH, n_credits - i));
	}
	/* With the extension gone, spending has nowhere to go: forget it. */
	for (int i = 0; !installed && i < n_credits; i++)
		credits[i].written = true;
	credits_take_back_unwritten(xid, credits, n_credits);
	if (installed)
		commit_flush_xact();
	else
		CommitTransactionCommand();
	usage_flush_done(xid, deltas, n);
	credits_flush_done(xid, credits, n_credits);
	MemoryContextReset(deltas_cxt);
	elog(DEBUG1, "apikeys worker wrote the usage counts of %d keys and the spending of %d in %ld ms", n, n_credits,
		 (long) (TimestampDifferenceMilliseconds(began, GetCurrentTimestamp())));
}

/*
 * Whether the worker waits the whole flush interval before its next flush,
 * even with no client connected: after a flush that failed (not counting
 * one a SIGTERM cancelled), found the audit chain held, or left work
 * behind with no client connected (spending on a row another transaction,
 * perhaps a prepared one, holds).  Retrying those four times a second would
 * only log, or commit, four times a second.
 */
static bool wait_whole_interval = false;

/* True while a flush runs: a SIGTERM then cancels it (see handle_sigterm()). */
static volatile sig_atomic_t flushing = false;

/*
 * One flush of the queued records, and of the usage counts when asked;
 * false when the extension is no longer installed here.
 */
static bool
flush_once(Oid dboid, bool with_usage)
{
	bool		installed;

	pgstat_report_activity(STATE_RUNNING, "apikeys: flushing audit records and usage");
	/* Audit rows commit (and release the chain's lock) before usage takes row locks. */
	installed = flush_audit(dboid);
	if (with_usage || !installed)
		flush_usage(dboid, installed);
	pgstat_report_activity(STATE_IDLE, NULL);
	return installed;
}

/*
 * A flush that reports its error instead of ending the worker: what it had
 * taken is back in shared memory (see flush_audit() and flush_usage()),
 * and the next interval tries again.  A flush that a SIGTERM cancelled is
 * not a failure.  Returns false when the extension is no longer installed
 * here.
 */
static bool
flush_or_report(Oid dboid, bool with_usage)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool installed = true;
	uint64		seq = registry_flush_starting(dboid);

	flushing = true;
	PG_TRY();
	{
		installed = flush_once(dboid, with_usage);
		/* apikeys.flush() waits for its records to be written, not just tried. */
		if (!audit_chain_busy)
			registry_flush_done(dboid, seq);
		/*
		 * Work left with no client to bring more is work this flush could
		 * not do; with clients, it may just be new, and the worker must
		 * still leave soon after the last client does.
		 */
		wait_whole_interval = audit_chain_busy ||
			(installed && CountDBConnections(dboid) == 0 && launcher_database_has_work(dboid));
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		HOLD_INTERRUPTS();
		flushing = false;
		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		if (!(edata->sqlerrcode == ERRCODE_QUERY_CANCELED && ShutdownRequestPending))
		{
			EmitErrorReport();
			registry_count_flush_failure();
			wait_whole_interval = true;
		}
		FreeErrorData(edata);
		AbortCurrentTransaction();
		FlushErrorState();
		MemoryContextReset(deltas_cxt);
		pgstat_report_activity(STATE_IDLE, NULL);
		RESUME_INTERRUPTS();
	}
	PG_END_TRY();
	flushing = false;
	return installed;
}

/*
 * SIGTERM (server shutdown, pg_terminate_backend, DROP DATABASE ... FORCE):
 * the worker writes what it holds once more and exits.  A flush under way,
 * perhaps waiting for a lock, is cancelled first; what it took goes back
 * to shared memory for that last flush.
 */
static void
handle_sigterm(SIGNAL_ARGS)
{
	int			save_errno = errno;

	ShutdownRequestPending = true;
	if (flushing)
	{
		QueryCancelPending = true;
		InterruptPending = true;
	}
	SetLatch(MyLatch);
	errno = save_errno;
}

/*
 * The last flushes before exiting: whatever arrived meanwhile goes too, but
 * no lock is waited for longer than a few seconds, so a worker told to stop
 * does stop.  What cannot be written stays in shared memory, for the next
 * worker (or is lost when the server is stopping).
 */
static void
flush_before_exit(Oid dboid)
{
	/* A cancel meant for the flush that SIGTERM interrupted is spent. */
	QueryCancelPending = false;
	SetConfigOption("lock_timeout", "2s", PGC_SUSET, PGC_S_OVERRIDE);
	for (int i = 0; i < 3 && launcher_database_has_work(dboid); i++)
		if (!flush_or_report(dboid, true))
			break;
}

/* How often a sleeping worker looks whether its database still has a client connected. */
#define IDLE_CHECK_MS 250
/* How long the database must have had no client before the worker writes and leaves. */
#define IDLE_LEAVE_MS 1000

/*
 * Sleeps until the flush interval since "since" has passed, a flush is
 * asked for (*with_usage: usage counts too), or a shutdown is requested;
 * or, unless told to wait the whole interval, until the database has had no
 * client for IDLE_LEAVE_MS: nothing new can then arrive, so the worker
 * writes what is left and leaves, and DROP DATABASE, which waits only 5
 * seconds for other sessions to go, finds none.  A session that came and
 * went between two looks counts as a client (a database whose clients
 * connect for each request keeps its worker rather than start one each
 * time).
 */
static void
wait_for_flush(Oid dboid, TimestampTz since, bool whole_interval, bool *with_usage)
{
	TimestampTz idle_since = 0;
	uint64		sessions_before = PG_UINT64_MAX;

	for (;;)
	{
		/* Recomputed each time: a reload may have shortened the interval. */
		TimestampTz due = TimestampTzPlusMilliseconds(since, flush_interval * 1000L);
		TimestampTz now = GetCurrentTimestamp();
		long		ms = TimestampDifferenceMilliseconds(now, due);
		uint64		sessions;

		if (ShutdownRequestPending || ms <= 0 ||
			registry_take_flush_request(dboid, with_usage, &sessions))
			return;
		/* Idle: no client now, and none came and went since the last look. */
		if (whole_interval || CountDBConnections(dboid) > 0 || sessions != sessions_before)
			idle_since = 0;
		else if (idle_since == 0)
			idle_since = now;
		else if (TimestampDifferenceExceeds(idle_since, now, IDLE_LEAVE_MS))
			return;
		sessions_before = sessions;
		/* A flush request or a reload sets the latch; only the idle check needs the looks. */
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 whole_interval ? ms : Min(ms, IDLE_CHECK_MS), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
	}
}

/*
 * A database's worker: connects, claims its registry slot, then flushes
 * every interval until nothing is left to write or it is told to stop.
 */
void
apikeys_worker_main(Datum main_arg)
{
	Oid			dboid = DatumGetObjectId(main_arg);
	TimestampTz usage_since;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, handle_sigterm);
	BackgroundWorkerUnblockSignals();
	/* Records are written even to a database that takes no connections. */
	BackgroundWorkerInitializeConnectionByOid(dboid, InvalidOid, BGWORKER_BYPASS_ALLOWCONN);
	pin_settings();
	if (!queue_available() || !registry_claim(dboid))
		proc_exit(0);
	deltas_cxt = AllocSetContextCreate(TopMemoryContext, "apikeys usage deltas",
									   ALLOCSET_DEFAULT_SIZES);

	/*
	 * Wait a flush interval, write, and leave once nothing is queued: an idle
	 * database keeps no worker connected (DROP DATABASE is not held up).
	 */
	usage_since = GetCurrentTimestamp();
	for (;;)
	{
		bool		with_usage = false;

		wait_for_flush(dboid, GetCurrentTimestamp(), wait_whole_interval, &with_usage);
		if (ShutdownRequestPending)
			break;
		if (RecoveryInProgress())
			continue;

		/*
		 * Usage counts are exact in shared memory all along, so they are
		 * written less often; at once when no client is connected, since
		 * then nothing new can be counted here.
		 */
		with_usage = with_usage ||
			TimestampDifferenceExceeds(usage_since, GetCurrentTimestamp(),
									   usage_flush_interval * 1000) ||
			CountDBConnections(dboid) == 0;
		if (with_usage)
			usage_since = GetCurrentTimestamp();
		if (!flush_or_report(dboid, with_usage))
			proc_exit(0);
		if (!ShutdownRequestPending && !launcher_database_has_work(dboid))
			proc_exit(0);
	}
	flush_before_exit(dboid);
	proc_exit(0);
}

/* Defines the workers' settings (from _PG_init). */
void
worker_init(void)
{
	DefineCustomIntVariable("apikeys.flush_interval",
							"How often background workers write queued records.",
							NULL,
							&flush_interval,
							10, 1, 3600,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);
	DefineCustomIntVariable("apikeys.usage_flush_interval",
							"How often background workers write usage counts.",
							"Counts are exact in shared memory meanwhile; a crash loses at most this much.",
							&usage_flush_interval,
							60, 1, 86400,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);
}
