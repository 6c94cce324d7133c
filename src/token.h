/*
 * token.h — the apikeys token codec: generation, parsing, check characters
 * and the stored digest.  Free of PostgreSQL headers so it can be unit-tested
 * and fuzzed on its own.
 *
 * Token text: <prefix>_<secret><check>
 */
#ifndef APIKEYS_TOKEN_H
#define APIKEYS_TOKEN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TOKEN_PREFIX_MIN	2
#define TOKEN_PREFIX_MAX	24
#define TOKEN_SECRET_LEN	32
#define TOKEN_CHECK_LEN		6
#define TOKEN_START_SECRET	4
/* prefix + '_' + secret + check */
#define TOKEN_MIN_LEN		(TOKEN_PREFIX_MIN + 1 + TOKEN_SECRET_LEN + TOKEN_CHECK_LEN)
#define TOKEN_MAX_LEN		(TOKEN_PREFIX_MAX + 1 + TOKEN_SECRET_LEN + TOKEN_CHECK_LEN)
#define TOKEN_DIGEST_LEN	32

typedef enum TokenError
{
	TOKEN_OK = 0,
	TOKEN_TOO_SHORT,
	TOKEN_TOO_LONG,
	TOKEN_NOT_ASCII,
	TOKEN_NO_SEPARATOR,
	TOKEN_BAD_PREFIX,
	TOKEN_BAD_SECRET_CHAR,
	TOKEN_BAD_CHECK_CHAR,
	TOKEN_BAD_CHECKSUM
} TokenError;

/* Checks a prefix on its own: 2-24 of [a-z0-9_], a letter first, no '_' last. */
extern bool token_prefix_valid(const char *prefix, size_t len);

/*
 * Parses a token.  On success returns TOKEN_OK and sets *prefix_len.  Never
 * reads past len bytes; any byte value is acceptable input.
 */
extern TokenError token_parse(const char *text, size_t len, size_t *prefix_len);

/* A sentence describing the error, without any part of the input. */
extern const char *token_error_detail(TokenError err);

/*
 * Writes a fresh token for the given (already validated) prefix into out,
 * which must hold TOKEN_MAX_LEN bytes; returns its length.  The caller wipes
 * out after use.
 */
extern size_t token_generate(const char *prefix, size_t prefix_len, char *out);

/* BLAKE2b-256 of the whole token text. */
extern void token_digest(const char *text, size_t len,
						 unsigned char out[TOKEN_DIGEST_LEN]);

/* Length of start ("<prefix>_" plus four secret characters) of a parsed token. */
static inline size_t
token_start_len(size_t prefix_len)
{
	return prefix_len + 1 + TOKEN_START_SECRET;
}

/* CRC-32 (IEEE 802.3, reflected, as zlib computes it). */
extern uint32_t token_crc32(const unsigned char *data, size_t len);

#endif							/* APIKEYS_TOKEN_H */
