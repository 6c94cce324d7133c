/*
 * hash.c — _audit_hash(prev, payload): BLAKE2b-256(prev || payload), the
 * link of the audit log's hash chain.
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/builtins.h"

#include <sodium.h>

#include "hash.h"

PG_FUNCTION_INFO_V1(apikeys_audit_hash);

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
