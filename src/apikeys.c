/*
 * apikeys.c — module initialisation: libsodium, GUCs and status().
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/guc.h"

#include <sodium.h>

#include "apikeys.h"
#include "token.h"

PG_MODULE_MAGIC;

char	   *apikeys_default_prefix = NULL;
bool		apikeys_preloaded = false;

static char *apikeys_default_plan = NULL;
static char *apikeys_actor = NULL;

void		_PG_init(void);

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

void
_PG_init(void)
{
	if (sodium_init() < 0)
		ereport(ERROR,
				(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
				 errmsg("could not initialise libsodium")));

	apikeys_preloaded = process_shared_preload_libraries_in_progress;

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

	MarkGUCPrefixReserved("apikeys");
}

PG_FUNCTION_INFO_V1(apikeys_status);

/*
 * status(): which parts of apikeys are active on this server.  Usage counters,
 * rate limits and failure records need the preloaded library and are not
 * built yet, so they report false.
 */
Datum
apikeys_status(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[5];
	bool		nulls[5] = {false};

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	values[0] = BoolGetDatum(apikeys_preloaded);
	values[1] = BoolGetDatum(false);	/* usage_tracking */
	values[2] = BoolGetDatum(false);	/* rate_limits */
	values[3] = BoolGetDatum(false);	/* failure_audit */
	values[4] = CStringGetTextDatum(apikeys_default_prefix);

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
