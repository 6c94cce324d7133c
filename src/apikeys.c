/*
 * apikeys.c — module initialisation (libsodium, the settings the SQL reads,
 * each module's own init), status(), and the settings read through the
 * library.
 */
#include "postgres.h"

#include "access/xlog.h"
#include "catalog/namespace.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "tcop/pquery.h"
#include "utils/builtins.h"
#include "utils/guc.h"

#include <sodium.h>

#include "apikeys.h"
#include "credits.h"
#include "launcher.h"
#include "locator.h"
#include "loghook.h"
#include "queue.h"
#include "token.h"
#include "usage.h"
#include "worker.h"

PG_MODULE_MAGIC;

char	   *apikeys_default_prefix = NULL;
/* True when the library was loaded through shared_preload_libraries. */
static bool apikeys_preloaded = false;

static char *apikeys_default_plan = NULL;
static char *apikeys_actor = NULL;
static char *apikeys_audit_context = NULL;
static int	apikeys_max_rotation_grace = 7 * SECS_PER_DAY;
static int	apikeys_audit_retention_min = 90 * SECS_PER_DAY;

void		_PG_init(void);

/* apikeys.default_prefix must be a prefix a token can carry. */
static bool
check_default_prefix(char **newval, void **extra, GucSource source)
{
	if (*newval == NULL || !token_prefix_valid(*newval, strlen(*newval)))
	{
		GUC_check_errcode(ERRCODE_INVALID_PARAMETER_VALUE);
		GUC_check_errdetail("A prefix is 2 to 24 lowercase letters, digits or underscores, starts with a letter and does not end with an underscore.");
		return false;
	}
	return true;
}

/* Defines the settings the extension's SQL reads through this library. */
static void
settings_init(void)
{
	DefineCustomStringVariable("apikeys.default_prefix",
							   "Prefix of keys created without an explicit prefix.",
							   NULL,
							   &apikeys_default_prefix,
							   "ak_live",
							   PGC_USERSET,
							   0,
							   check_default_prefix, NULL, NULL);

	DefineCustomStringVariable("apikeys.default_plan",
							   "Plan of an owner that has no row in apikeys.owners yet.",
							   NULL,
							   &apikeys_default_plan,
							   "free",
							   PGC_SUSET,
							   0,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("apikeys.actor",
							   "Who the application says is acting; recorded instead of current_user.",
							   NULL,
							   &apikeys_actor,
							   "",
							   PGC_USERSET,
							   0,
							   NULL, NULL, NULL);

	/* Set by the extension's own functions so audit rows name their context. */
	DefineCustomStringVariable("apikeys.audit_context",
							   "Internal: which apikeys function is making a change.",
							   NULL,
							   &apikeys_audit_context,
							   "",
							   PGC_SUSET,
							   GUC_NO_SHOW_ALL | GUC_NOT_IN_SAMPLE | GUC_NO_RESET_ALL,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("apikeys.max_rotation_grace",
							"Longest grace period rotate() gives the key it replaces.",
							NULL,
							&apikeys_max_rotation_grace,
							7 * SECS_PER_DAY, 0, INT_MAX,
							PGC_SUSET,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("apikeys.audit_retention_min",
							"Age below which purge_audit() removes no audit row.",
							NULL,
							&apikeys_audit_retention_min,
							90 * SECS_PER_DAY, 0, INT_MAX,
							PGC_SUSET,
							GUC_UNIT_S,
							NULL, NULL, NULL);
}

/* Loads the library: settings, and with the preload shared memory and workers. */
void
_PG_init(void)
{
	if (sodium_init() < 0)
		ereport(ERROR,
				(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
				 errmsg("could not initialise libsodium")));

	apikeys_preloaded = process_shared_preload_libraries_in_progress;
	settings_init();
	worker_init();
	usage_init();
	credits_init();
	if (apikeys_preloaded)
	{
		queue_init();
		launcher_init();
		loghook_init();
		locator_init();
	}
	MarkGUCPrefixReserved("apikeys");
}

PG_FUNCTION_INFO_V1(apikeys_status);

/*
 * status(): which parts of apikeys are active on this server.  Usage
 * counters, rate limits and records that survive rollback need the preload.
 */
Datum
apikeys_status(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[15];
	bool		nulls[15] = {false};
	bool		shared = queue_available();
	int64		queued_now;
	int64		queued_total;
	int64		dropped;
	int64		lost;
	int64		tracked;
	int64		untracked;
	int64		workers;
	int64		start_failures;
	int64		flush_failures;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	queue_stats(&queued_now, &queued_total, &dropped, &lost);
	usage_stats(&tracked, &untracked);
	launcher_stats(&workers, &start_failures, &flush_failures);

	/* A standby enforces rate limits but keeps no counts and records nothing. */
	values[0] = BoolGetDatum(apikeys_preloaded);
	values[1] = BoolGetDatum(shared && !RecoveryInProgress());	/* usage_tracking */
	values[2] = BoolGetDatum(shared);	/* rate_limits */
	values[3] = BoolGetDatum(shared && !RecoveryInProgress());	/* failure_audit */
	values[4] = CStringGetTextDatum(apikeys_default_prefix);
	values[5] = Int64GetDatum(queued_now);
	values[6] = Int64GetDatum(queued_total);
	values[7] = Int64GetDatum(dropped);
	values[8] = Int64GetDatum(tracked);
	values[9] = Int64GetDatum(untracked);
	values[10] = BoolGetDatum(RecoveryInProgress());
	values[11] = Int64GetDatum(workers);
	values[12] = Int64GetDatum(start_failures);
	values[13] = Int64GetDatum(flush_failures);
	values[14] = Int64GetDatum(lost);

	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

PG_FUNCTION_INFO_V1(apikeys_default_plan_name);

/*
 * _default_plan(): apikeys.default_plan read through the loaded library, so a
 * placeholder an unprivileged session set before the library loaded is never
 * trusted.
 */
Datum
apikeys_default_plan_name(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(apikeys_default_plan));
}

/*
 * The library's settings are read through these functions rather than
 * current_setting(): calling into the library loads it, and loading it
 * refuses any value an unprivileged session gave a superuser-only setting
 * while it was still an unknown placeholder.
 */

/* An interval of whole seconds, as days and time. */
static Interval *
seconds_interval(int seconds)
{
	Interval   *result = palloc0(sizeof(Interval));

	result->day = seconds / SECS_PER_DAY;
	result->time = (int64) (seconds % SECS_PER_DAY) * USECS_PER_SEC;
	return result;
}

PG_FUNCTION_INFO_V1(apikeys_max_rotation_grace_setting);

/* _max_rotation_grace(): apikeys.max_rotation_grace as an interval. */
Datum
apikeys_max_rotation_grace_setting(PG_FUNCTION_ARGS)
{
	PG_RETURN_INTERVAL_P(seconds_interval(apikeys_max_rotation_grace));
}

PG_FUNCTION_INFO_V1(apikeys_audit_retention_min_setting);

/* _audit_retention_min(): apikeys.audit_retention_min as an interval. */
Datum
apikeys_audit_retention_min_setting(PG_FUNCTION_ARGS)
{
	PG_RETURN_INTERVAL_P(seconds_interval(apikeys_audit_retention_min));
}

PG_FUNCTION_INFO_V1(apikeys_audit_context_setting);

/* _audit_context(): which apikeys function is making the change ('' if none). */
Datum
apikeys_audit_context_setting(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(apikeys_audit_context ? apikeys_audit_context : ""));
}

PG_FUNCTION_INFO_V1(apikeys_restoring);

/*
 * _restoring(table): whether the row being written arrives from a restore,
 * so it is kept as it was dumped.  A restore is a superuser's COPY ... FROM
 * into this very table, named with its schema, as pg_restore and pg_dump's
 * scripts write it.  No setting a database owner or a role can give a
 * session makes any other write look like one.
 */
Datum
apikeys_restoring(PG_FUNCTION_ARGS)
{
	Oid			relid = PG_GETARG_OID(0);
	PlannedStmt *planned;
	CopyStmt   *copy;

	if (ActivePortal == NULL || list_length(ActivePortal->stmts) != 1)
		PG_RETURN_BOOL(false);
	planned = linitial_node(PlannedStmt, ActivePortal->stmts);
	if (planned->commandType != CMD_UTILITY || !IsA(planned->utilityStmt, CopyStmt))
		PG_RETURN_BOOL(false);
	copy = (CopyStmt *) planned->utilityStmt;
	if (!copy->is_from || copy->relation == NULL || copy->relation->schemaname == NULL)
		PG_RETURN_BOOL(false);
	/* The role that ran the COPY: SECURITY DEFINER changes only the current user. */
	if (!superuser_arg(GetOuterUserId()))
		PG_RETURN_BOOL(false);
	PG_RETURN_BOOL(RangeVarGetRelid(copy->relation, NoLock, true) == relid);
}
