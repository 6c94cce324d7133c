/*
 * apikey_type.c — input, output and binary I/O of apikeys.apikey, its
 * accessors, and the generator that create_key and rotate use.
 */
#include "postgres.h"

#include "fmgr.h"
#include "libpq/pqformat.h"
#include "utils/builtins.h"

#include <sodium.h>

#include "apikeys.h"
#include "loghook.h"
#include "token.h"

/* Raises 22P02 for text that is not a well-formed token; returns its prefix length. */
static size_t
apikey_check_input(const char *str, size_t len)
{
	size_t		prefix_len = 0;
	TokenError	err = token_parse(str, len, &prefix_len);

	/*
	 * The statement text, or a caller's in the context, may hold the token,
	 * and a near-miss is still a secret worth keeping out of the server log.
	 */
	if (err != TOKEN_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg(APIKEY_INPUT_ERROR_MESSAGE),
				 errdetail("%s", token_error_detail(err)),
				 errhidestmt(true),
				 errhidecontext(true)));
	return prefix_len;
}

/* A token's bytes as text. */
static text *
token_to_text(const char *str, size_t len)
{
	return cstring_to_text_with_len(str, (int) len);
}

PG_FUNCTION_INFO_V1(apikey_in);

/* apikey input: checks the token's format and checksum. */
Datum
apikey_in(PG_FUNCTION_ARGS)
{
	char	   *str = PG_GETARG_CSTRING(0);
	size_t		len = strlen(str);

	apikey_check_input(str, len);
	PG_RETURN_TEXT_P(token_to_text(str, len));
}

PG_FUNCTION_INFO_V1(apikey_out);

/* apikey output: the token as typed. */
Datum
apikey_out(PG_FUNCTION_ARGS)
{
	text	   *token = PG_GETARG_TEXT_PP(0);

	PG_RETURN_CSTRING(text_to_cstring(token));
}

PG_FUNCTION_INFO_V1(apikey_recv);

/* apikey binary input: checked as apikey_in() checks text. */
Datum
apikey_recv(PG_FUNCTION_ARGS)
{
	StringInfo	buf = (StringInfo) PG_GETARG_POINTER(0);
	size_t		len = (size_t) (buf->len - buf->cursor);
	const char *str = pq_getmsgbytes(buf, (int) len);

	apikey_check_input(str, len);
	PG_RETURN_TEXT_P(token_to_text(str, len));
}

PG_FUNCTION_INFO_V1(apikey_send);

/* apikey binary output: the token's bytes. */
Datum
apikey_send(PG_FUNCTION_ARGS)
{
	text	   *token = PG_GETARG_TEXT_PP(0);
	StringInfoData buf;

	pq_begintypsend(&buf);
	pq_sendbytes(&buf, VARDATA_ANY(token), VARSIZE_ANY_EXHDR(token));
	PG_RETURN_BYTEA_P(pq_endtypsend(&buf));
}

/*
 * Values of the type were checked on the way in, so the accessors only need
 * the prefix length: everything after the last 38 characters' separator.
 */
static size_t
stored_prefix_len(text *token)
{
	return VARSIZE_ANY_EXHDR(token) - (1 + TOKEN_SECRET_LEN + TOKEN_CHECK_LEN);
}

PG_FUNCTION_INFO_V1(apikey_prefix);

/* prefix(apikey): the part before the secret, e.g. "ak_live". */
Datum
apikey_prefix(PG_FUNCTION_ARGS)
{
	text	   *token = PG_GETARG_TEXT_PP(0);

	PG_RETURN_TEXT_P(token_to_text(VARDATA_ANY(token), stored_prefix_len(token)));
}

PG_FUNCTION_INFO_V1(apikey_start);

/* start(apikey): the prefix and first characters, safe to show. */
Datum
apikey_start(PG_FUNCTION_ARGS)
{
	text	   *token = PG_GETARG_TEXT_PP(0);

	PG_RETURN_TEXT_P(token_to_text(VARDATA_ANY(token),
								   token_start_len(stored_prefix_len(token))));
}

PG_FUNCTION_INFO_V1(apikey_digest);

/* digest(apikey): the BLAKE2b-256 digest keys are stored under. */
Datum
apikey_digest(PG_FUNCTION_ARGS)
{
	text	   *token = PG_GETARG_TEXT_PP(0);
	bytea	   *result = palloc(VARHDRSZ + TOKEN_DIGEST_LEN);

	SET_VARSIZE(result, VARHDRSZ + TOKEN_DIGEST_LEN);
	token_digest(VARDATA_ANY(token), VARSIZE_ANY_EXHDR(token),
				 (unsigned char *) VARDATA(result));
	PG_RETURN_BYTEA_P(result);
}

PG_FUNCTION_INFO_V1(apikey_is_well_formed);

/* is_well_formed(text): whether text parses as a token (NULL: false). */
Datum
apikey_is_well_formed(PG_FUNCTION_ARGS)
{
	text	   *str;
	size_t		prefix_len;

	if (PG_ARGISNULL(0))
		PG_RETURN_BOOL(false);
	str = PG_GETARG_TEXT_PP(0);
	PG_RETURN_BOOL(token_parse(VARDATA_ANY(str), VARSIZE_ANY_EXHDR(str),
							   &prefix_len) == TOKEN_OK);
}

PG_FUNCTION_INFO_V1(apikey_generate);

/*
 * _new_token(prefix): a fresh token; NULL prefix means apikeys.default_prefix.
 * Internal to create_key and rotate, which store only its digest.
 */
Datum
apikey_generate(PG_FUNCTION_ARGS)
{
	const char *prefix;
	size_t		prefix_len;
	char		buf[TOKEN_MAX_LEN];
	size_t		len;
	text	   *result;

	if (PG_ARGISNULL(0))
		prefix = apikeys_default_prefix;
	else
		prefix = text_to_cstring(PG_GETARG_TEXT_PP(0));
	prefix_len = strlen(prefix);

	if (!token_prefix_valid(prefix, prefix_len))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid key prefix"),
				 errdetail("A prefix is 2 to 24 lowercase letters, digits or underscores, starts with a letter and does not end with an underscore.")));

	len = token_generate(prefix, prefix_len, buf);
	result = token_to_text(buf, len);
	sodium_memzero(buf, sizeof(buf));
	PG_RETURN_TEXT_P(result);
}
