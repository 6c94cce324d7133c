/*
 * audit.c — the C side of the audit log: the hash chain's link and its tail
 * as of now, and records queued in shared memory for the background worker
 * (so they stay even when the caller's transaction rolls back).
 */
#include "postgres.h"

#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/snapmgr.h"

#include <sodium.h>

#include "audit.h"
#include "launcher.h"
#include "queue.h"

/* A link of the chain: BLAKE2b-256 over the previous row's hash and the row. */
#define AUDIT_HASH_LEN 32

PG_FUNCTION_INFO_V1(apikeys_audit_hash);

/* _audit_hash(prev, payload): BLAKE2b-256(prev || payload), the chain's next link. */
Datum
apikeys_audit_hash(PG_FUNCTION_ARGS)
{
	bytea	   *prev = PG_GETARG_BYTEA_PP(0);
	text	   *payload = PG_GETARG_TEXT_PP(1);
	crypto_generichash_state state;
	bytea	   *result = palloc(VARHDRSZ + AUDIT_HASH_LEN);

	if (VARSIZE_ANY_EXHDR(prev) != AUDIT_HASH_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("previous audit hash must be %d bytes", AUDIT_HASH_LEN)));

	crypto_generichash_init(&state, NULL, 0, AUDIT_HASH_LEN);
	crypto_generichash_update(&state, (const unsigned char *) VARDATA_ANY(prev),
							  VARSIZE_ANY_EXHDR(prev));
	crypto_generichash_update(&state, (const unsigned char *) VARDATA_ANY(payload),
							  VARSIZE_ANY_EXHDR(payload));
	SET_VARSIZE(result, VARHDRSZ + AUDIT_HASH_LEN);
	crypto_generichash_final(&state, (unsigned char *) VARDATA(result), AUDIT_HASH_LEN);
	PG_RETURN_BYTEA_P(result);
}

PG_FUNCTION_INFO_V1(apikeys_audit_tail);

/*
 * _audit_tail(): id and hash of the last audit row.  Read with the latest
 * snapshot: the caller holds the chain's lock, so this is the true tail even
 * when the caller's own snapshot (REPEATABLE READ) is older.
 */
Datum
apikeys_audit_tail(PG_FUNCTION_ARGS)
{
	MemoryContext caller_cxt = CurrentMemoryContext;
	TupleDesc	tupdesc;
	Datum		values[2] = {0, 0};
	bool		nulls[2] = {true, true};

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	SPI_connect();
	PushActiveSnapshot(GetLatestSnapshot());
	if (SPI_execute("SELECT id, hash FROM apikeys.audit_log ORDER BY id DESC LIMIT 1",
					true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read the audit log's last row");
	if (SPI_processed > 0)
	{
		HeapTuple	tuple = SPI_tuptable->vals[0];
		MemoryContext spi_cxt = MemoryContextSwitchTo(caller_cxt);

		values[0] = SPI_getbinval(tuple, SPI_tuptable->tupdesc, 1, &nulls[0]);
		values[1] = PointerGetDatum(PG_DETOAST_DATUM_COPY(SPI_getbinval(tuple, SPI_tuptable->tupdesc, 2, &nulls[1])));
		MemoryContextSwitchTo(spi_cxt);
	}
	PopActiveSnapshot();
	SPI_finish();

	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/*
 * Fills the record's actor and db_user: the calling role as the session
 * sees it (SET ROLE's role, else the login role), and apikeys.actor when
 * the application set it, cut to APIKEYS_TEXT_MAX_CHARS characters.
 */
static void
caller_names(QueuedEvent *ev)
{
	Oid			role = OidIsValid(GetCurrentRoleId()) ? GetCurrentRoleId() : GetSessionUserId();
	char	   *name = GetUserNameFromId(role, true);
	const char *setting = GetConfigOption("apikeys.actor", true, false);
	const char *actor = (setting && setting[0]) ? setting : (name ? name : "");
	int			len = pg_mbcharcliplen(actor, (int) strlen(actor), APIKEYS_TEXT_MAX_CHARS);

	strlcpy(ev->db_user, name ? name : "", sizeof(ev->db_user));
	len = Min(len, (int) sizeof(ev->actor) - 1);
	memcpy(ev->actor, actor, len);
	ev->actor[len] = '\0';
}

/* Queues one occurrence for the worker; a no-op on a standby. */
static void
enqueue_record(QueuedEvent *ev)
{
	if (RecoveryInProgress())
		return;
	ev->count = 1;
	caller_names(ev);
	if (queue_add(ev))
		launcher_note_pending();
}

/* Queues a verify_failed record, per key or per prefix. */
void
audit_record_verify_failure(const pg_uuid_t *key_id, const char *owner,
							const char *prefix, size_t prefix_len, int reason_code)
{
	QueuedEvent ev;

	if (!queue_available())
		return;

	memset(&ev, 0, sizeof(ev));
	queue_key_init(&ev.key, EVENT_VERIFY_FAILED);
	ev.key.reason = reason_code;
	if (key_id != NULL)
	{
		memcpy(&ev.key.key_id, key_id, sizeof(pg_uuid_t));
		queue_copy_text(ev.key.owner, sizeof(ev.key.owner), owner);
	}
	else if (prefix != NULL)
	{
		/* A parsed prefix is 2-24 of [a-z0-9_]. */
		Assert(prefix_len < sizeof(ev.key.prefix));
		memcpy(ev.key.prefix, prefix, prefix_len);
	}
	enqueue_record(&ev);
}

/* Queues a usage_alert and wakes the database's worker. */
void
audit_record_usage_alert(const pg_uuid_t *key_id, const char *owner,
						 const char *start, int64 requests, int32 threshold)
{
	QueuedEvent ev;

	if (!queue_available())
		return;

	memset(&ev, 0, sizeof(ev));
	queue_key_init(&ev.key, EVENT_USAGE_ALERT);
	memcpy(&ev.key.key_id, key_id, sizeof(pg_uuid_t));
	queue_copy_text(ev.key.owner, sizeof(ev.key.owner), owner);
	queue_copy_text(ev.start, sizeof(ev.start), start);
	ev.requests = requests;
	ev.threshold = threshold;
	enqueue_record(&ev);
	launcher_wake_worker(MyDatabaseId);
}

PG_FUNCTION_INFO_V1(apikeys_record_limit_exceeded);

/*
 * _record_limit_exceeded(owner, plan, max_keys): queue a limit_exceeded
 * record, which survives the caller's rollback.  Records merge per owner,
 * plan, limit and minute.  A no-op without the preload.
 */
Datum
apikeys_record_limit_exceeded(PG_FUNCTION_ARGS)
{
	QueuedEvent ev;

	if (!queue_available() || PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2))
		PG_RETURN_VOID();

	memset(&ev, 0, sizeof(ev));
	queue_key_init(&ev.key, EVENT_LIMIT_EXCEEDED);
	queue_copy_text(ev.key.owner, sizeof(ev.key.owner), text_to_cstring(PG_GETARG_TEXT_PP(0)));
	queue_copy_text(ev.key.plan, sizeof(ev.key.plan), text_to_cstring(PG_GETARG_TEXT_PP(1)));
	ev.key.max_keys = PG_GETARG_INT32(2);
	enqueue_record(&ev);
	PG_RETURN_VOID();
}
