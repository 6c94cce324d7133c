/*
 * audit.c — the C side of the audit log: the chain's tail as of now, and
 * records queued in shared memory for the background worker (so they stay
 * even when the caller's transaction rolls back).
 */
#include "postgres.h"

#include <time.h>

#include "access/htup_details.h"
#include "access/xlog.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "audit.h"
#include "shmem.h"
#include "usage.h"
#include "worker.h"

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

/* The calling role as the session sees it: SET ROLE's role, else the login role. */
static void
caller_names(char *db_user, size_t db_user_len, char *actor, size_t actor_len)
{
	Oid			role = OidIsValid(GetCurrentRoleId()) ? GetCurrentRoleId() : GetSessionUserId();
	char	   *name = GetUserNameFromId(role, true);
	const char *setting = GetConfigOption("apikeys.actor", true, false);

	strlcpy(db_user, name ? name : "", db_user_len);
	strlcpy(actor, (setting && setting[0]) ? setting : db_user, actor_len);
}

static void
queue_record(QueuedEventKey *key, const char *owner, const char *details)
{
	char		db_user[NAMEDATALEN];
	char		actor[APIKEYS_SUBJECT_LEN];

	if (apikeys_shared == NULL || RecoveryInProgress())
		return;
	key->dboid = MyDatabaseId;
	key->minute = (int64) (time(NULL) / 60);
	caller_names(db_user, sizeof(db_user), actor, sizeof(actor));
	if (apikeys_enqueue(key, owner, actor, db_user, details))
		apikeys_note_pending();
}

void
audit_record_verify_failure(const pg_uuid_t *key_id, const char *owner,
							const char *prefix, size_t prefix_len,
							int reason_code, const char *reason)
{
	QueuedEventKey key;
	char		details[APIKEYS_DETAILS_LEN];

	if (apikeys_shared == NULL)
		return;

	memset(&key, 0, sizeof(key));	/* the key is compared as bytes */
	key.kind = EVENT_VERIFY_FAILED;
	key.reason = reason_code;
	if (key_id != NULL)
		memcpy(&key.key_id, key_id, sizeof(pg_uuid_t));
	else if (prefix != NULL)
		memcpy(key.subject, prefix, Min(prefix_len, sizeof(key.subject) - 1));

	/* Prefixes are [a-z0-9_] and reasons are codes: nothing to escape. */
	if (key_id == NULL && prefix != NULL)
		snprintf(details, sizeof(details), "{\"reason\": \"%s\", \"prefix\": \"%s\"}",
				 reason, key.subject);
	else if (key_id == NULL)
		snprintf(details, sizeof(details), "{\"reason\": \"%s\", \"malformed\": true}", reason);
	else
		snprintf(details, sizeof(details), "{\"reason\": \"%s\"}", reason);

	queue_record(&key, owner, details);
}

void
audit_record_usage_alert(const pg_uuid_t *key_id, const char *owner,
						 const char *start, int64 requests)
{
	QueuedEventKey key;
	StringInfoData details;
	char	   *key_text;

	if (apikeys_shared == NULL)
		return;

	memset(&key, 0, sizeof(key));
	key.kind = EVENT_USAGE_ALERT;
	memcpy(&key.key_id, key_id, sizeof(pg_uuid_t));

	key_text = DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(key_id)));
	initStringInfo(&details);
	appendStringInfo(&details, "{\"key_id\": \"%s\", \"owner\": ", key_text);
	escape_json(&details, owner);
	appendStringInfoString(&details, ", \"start\": ");
	escape_json(&details, start);
	appendStringInfo(&details, ", \"requests\": " INT64_FORMAT ", \"threshold\": %d}",
					 requests, apikeys_alert_requests_per_minute);

	queue_record(&key, owner, details.len < APIKEYS_DETAILS_LEN ? details.data : "{}");
	apikeys_wake_worker(MyDatabaseId);
}

PG_FUNCTION_INFO_V1(apikeys_record_event);

/*
 * _record_event(event, owner, key_id, details): queue a record that survives
 * rollback; only limit_exceeded comes from SQL.  Details that do not fit the
 * queue's slot are replaced by a note saying so.
 */
Datum
apikeys_record_event(PG_FUNCTION_ARGS)
{
	QueuedEventKey key;
	char	   *event;
	char	   *owner = NULL;
	char	   *details = "{}";

	if (apikeys_shared == NULL || PG_ARGISNULL(0))
		PG_RETURN_VOID();

	event = text_to_cstring(PG_GETARG_TEXT_PP(0));
	if (strcmp(event, "limit_exceeded") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown queued audit event \"%s\"", event)));

	memset(&key, 0, sizeof(key));
	key.kind = EVENT_LIMIT_EXCEEDED;
	if (!PG_ARGISNULL(1))
	{
		owner = text_to_cstring(PG_GETARG_TEXT_PP(1));
		strlcpy(key.subject, owner, sizeof(key.subject));
	}
	if (!PG_ARGISNULL(2))
		memcpy(&key.key_id, PG_GETARG_UUID_P(2), sizeof(pg_uuid_t));
	if (!PG_ARGISNULL(3))
	{
		Jsonb	   *jb = PG_GETARG_JSONB_P(3);

		details = JsonbToCString(NULL, &jb->root, VARSIZE(jb));
		if (strlen(details) >= APIKEYS_DETAILS_LEN)
			details = "{\"details_truncated\": true}";
	}

	queue_record(&key, owner, details);
	PG_RETURN_VOID();
}
