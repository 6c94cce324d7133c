/*
 * loghook.c — an emit_log_hook that keeps tokens, and floods of refused
 * keys, out of the server log.
 *
 * errhidestmt and errhidecontext keep the statement and the context out of
 * a report, but when a malformed token is a literal cast to apikeys.apikey
 * inside PL/pgSQL, the input function runs while the expression is parsed,
 * and PL/pgSQL adds the expression itself as the report's internal query
 * ("QUERY:  k := 'ak_live_...'::apikeys.apikey").  The hook removes that
 * query, and its position, from apikeys' own input errors.
 *
 * authenticate() refuses a key by raising 28000; each refusal would write an
 * ERROR and a DETAIL line to the server log, so a client sending bad tokens
 * could fill the disk.  The refusals are in the audit log already
 * (aggregated per key and prefix), so the hook keeps exactly those reports
 * out of the server log; the client still gets the error.  They are told by
 * the C function that raised them, which no SQL can imitate.
 *
 * revoke_token() takes a leaked token pasted into the caller's statement,
 * so any error while it runs (a reason too long, a lock timeout) is logged
 * without that statement.  Its context line names it, qualified (it runs
 * with search_path pg_catalog, pg_temp); only a function in schema apikeys
 * could be named so, and hiding a statement never reveals anything.
 */
#include "postgres.h"

#include "loghook.h"

static emit_log_hook_type prev_emit_log_hook = NULL;

/*
 * Strips every part of an apikey input error that may quote the token, and
 * keeps authenticate()'s refusals out of the server log.
 */
static void
apikeys_emit_log(ErrorData *edata)
{
	if (edata->sqlerrcode == ERRCODE_INVALID_TEXT_REPRESENTATION &&
		edata->message_id != NULL &&
		strcmp(edata->message_id, APIKEY_INPUT_ERROR_MESSAGE) == 0)
	{
		edata->internalquery = NULL;
		edata->internalpos = 0;
		edata->hide_stmt = true;
		edata->hide_ctx = true;
	}
	else if (edata->sqlerrcode == ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION &&
			 edata->funcname != NULL &&
			 strcmp(edata->funcname, AUTHENTICATE_REFUSAL_FUNCTION) == 0)
		edata->output_to_server = false;
	else if (edata->context != NULL && strstr(edata->context, REVOKE_TOKEN_CONTEXT) != NULL)
		edata->hide_stmt = true;
	if (prev_emit_log_hook)
		prev_emit_log_hook(edata);
}

/* Installs the hook (from _PG_init, preload only). */
void
loghook_init(void)
{
	prev_emit_log_hook = emit_log_hook;
	emit_log_hook = apikeys_emit_log;
}
