/*
 * token.c — the apikeys token codec (see token.h).
 *
 * Secrets come from libsodium's CSPRNG; base62 characters are drawn by
 * rejection sampling so every character is equally likely.
 */
#include "token.h"

#include <string.h>
#include <sodium.h>

static const char base62_alphabet[] =
"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/* The largest multiple of 62 that fits a byte: bytes at or above it are redrawn. */
#define BASE62_REJECT_AT	(62 * 4)

static uint32_t crc32_table[256];
static bool crc32_ready = false;

/* Fills the CRC-32 table once. */
static void
crc32_init(void)
{
	for (uint32_t i = 0; i < 256; i++)
	{
		uint32_t	c = i;

		for (int k = 0; k < 8; k++)
			c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
		crc32_table[i] = c;
	}
	crc32_ready = true;
}

/* CRC-32 (IEEE) of data. */
uint32_t
token_crc32(const unsigned char *data, size_t len)
{
	uint32_t	crc = 0xFFFFFFFFu;

	if (!crc32_ready)
		crc32_init();
	for (size_t i = 0; i < len; i++)
		crc = crc32_table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
	return crc ^ 0xFFFFFFFFu;
}

/* Whether c is one of the 62 characters a secret is made of. */
static inline bool
is_base62(unsigned char c)
{
	return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
}

/* The checksum characters of a token's prefix and secret. */
static void
encode_check(const char *body, size_t len, char out[TOKEN_CHECK_LEN])
{
	uint32_t	crc = token_crc32((const unsigned char *) body, len);

	for (int i = TOKEN_CHECK_LEN - 1; i >= 0; i--)
	{
		out[i] = base62_alphabet[crc % 62];
		crc /= 62;
	}
}

/* Whether a prefix follows the rules (2-24 of [a-z0-9_], a letter first, no trailing _). */
bool
token_prefix_valid(const char *prefix, size_t len)
{
	if (len < TOKEN_PREFIX_MIN || len > TOKEN_PREFIX_MAX)
		return false;
	if (prefix[0] < 'a' || prefix[0] > 'z')
		return false;
	if (prefix[len - 1] == '_')
		return false;
	for (size_t i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) prefix[i];

		if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'))
			return false;
	}
	return true;
}

/* Checks a token's format and checksum; sets its prefix length. */
TokenError
token_parse(const char *text, size_t len, size_t *prefix_len)
{
	size_t		tail = 1 + TOKEN_SECRET_LEN + TOKEN_CHECK_LEN;
	size_t		plen;
	char		check[TOKEN_CHECK_LEN];

	if (len < TOKEN_MIN_LEN)
		return TOKEN_TOO_SHORT;
	if (len > TOKEN_MAX_LEN)
		return TOKEN_TOO_LONG;

	for (size_t i = 0; i < len; i++)
		if ((unsigned char) text[i] >= 0x80)
			return TOKEN_NOT_ASCII;

	/* The secret and check have a fixed length, so the separator's place is known. */
	plen = len - tail;
	if (text[plen] != '_')
		return TOKEN_NO_SEPARATOR;
	if (!token_prefix_valid(text, plen))
		return TOKEN_BAD_PREFIX;
	for (size_t i = plen + 1; i < plen + 1 + TOKEN_SECRET_LEN; i++)
		if (!is_base62((unsigned char) text[i]))
			return TOKEN_BAD_SECRET_CHAR;
	for (size_t i = len - TOKEN_CHECK_LEN; i < len; i++)
		if (!is_base62((unsigned char) text[i]))
			return TOKEN_BAD_CHECK_CHAR;

	encode_check(text, len - TOKEN_CHECK_LEN, check);
	if (memcmp(check, text + len - TOKEN_CHECK_LEN, TOKEN_CHECK_LEN) != 0)
		return TOKEN_BAD_CHECKSUM;

	*prefix_len = plen;
	return TOKEN_OK;
}

/* The errdetail sentence for a parse error. */
const char *
token_error_detail(TokenError err)
{
	switch (err)
	{
		case TOKEN_OK:
			return "The token is well formed.";
		case TOKEN_TOO_SHORT:
			return "The token is shorter than 41 characters, the least a prefix, separator, secret and check can take.";
		case TOKEN_TOO_LONG:
			return "The token is longer than 63 characters, the most a prefix, separator, secret and check can take.";
		case TOKEN_NOT_ASCII:
			return "The token contains a character outside ASCII.";
		case TOKEN_NO_SEPARATOR:
			return "The token has no \"_\" before its last 38 characters.";
		case TOKEN_BAD_PREFIX:
			return "The prefix must be 2 to 24 lowercase letters, digits or underscores, start with a letter and not end with an underscore.";
		case TOKEN_BAD_SECRET_CHAR:
			return "The secret contains a character outside 0-9, A-Z and a-z.";
		case TOKEN_BAD_CHECK_CHAR:
			return "The check characters contain a character outside 0-9, A-Z and a-z.";
		case TOKEN_BAD_CHECKSUM:
			return "The check characters do not match the rest of the token: it was mistyped or truncated.";
	}
	return "The token is malformed.";
}

/* A new token with the prefix and 32 random base62 characters. */
size_t
token_generate(const char *prefix, size_t prefix_len, char *out)
{
	unsigned char pool[64];
	size_t		pos = sizeof(pool);
	size_t		n = 0;

	memcpy(out, prefix, prefix_len);
	out[prefix_len] = '_';
	while (n < TOKEN_SECRET_LEN)
	{
		if (pos == sizeof(pool))
		{
			randombytes_buf(pool, sizeof(pool));
			pos = 0;
		}
		if (pool[pos] < BASE62_REJECT_AT)
			out[prefix_len + 1 + n++] = base62_alphabet[pool[pos] % 62];
		pos++;
	}
	sodium_memzero(pool, sizeof(pool));

	encode_check(out, prefix_len + 1 + TOKEN_SECRET_LEN,
				 out + prefix_len + 1 + TOKEN_SECRET_LEN);
	return prefix_len + 1 + TOKEN_SECRET_LEN + TOKEN_CHECK_LEN;
}

/* The digest a token is stored under (BLAKE2b-256). */
void
token_digest(const char *text, size_t len, unsigned char out[TOKEN_DIGEST_LEN])
{
	crypto_generichash(out, TOKEN_DIGEST_LEN, (const unsigned char *) text, len,
					   NULL, 0);
}
