/*
 * token_test.c — unit tests of the token codec, built without PostgreSQL.
 * Prints "N passed, N failed" and exits non-zero on any failure.
 */
#include <stdio.h>
#include <string.h>
#include <sodium.h>

#include "token.h"

static int	passed = 0;
static int	failed = 0;

#define CHECK(cond, ...) \
	do { \
		if (cond) passed++; \
		else { failed++; printf("FAIL %s:%d: ", __FILE__, __LINE__); printf(__VA_ARGS__); printf("\n"); } \
	} while (0)

static const char alphabet[] =
"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/* Whether the codec accepts s. */
static int
parses(const char *s)
{
	size_t		plen;

	return token_parse(s, strlen(s), &plen) == TOKEN_OK;
}

/* Known answers: the CRC-32 check value, independently computed tokens, a BLAKE2b-256 vector. */
static void
test_known_vectors(void)
{
	unsigned char d[TOKEN_DIGEST_LEN];
	char		hex[TOKEN_DIGEST_LEN * 2 + 1];

	/* The CRC-32 check value every IEEE implementation agrees on. */
	CHECK(token_crc32((const unsigned char *) "123456789", 9) == 0xCBF43926u, "crc32 check value");

	/* Tokens whose check characters were computed independently (zlib.crc32). */
	CHECK(parses("ak_live_000000000000000000000000000000004YzvZp"), "known token 1");
	CHECK(parses("hm_test_abcdefghijklmnopqrstuvwxyzABCDEF0cGHw9"), "known token 2");

	token_digest("abc", 3, d);
	sodium_bin2hex(hex, sizeof(hex), d, sizeof(d));
	CHECK(strcmp(hex, "bddd813c634239723171ef3fee98579b94964e3bb1cb3e427262c8c068d52319") == 0,
		  "blake2b-256(abc) = %s", hex);
}

/* The prefix rules. */
static void
test_prefix_rules(void)
{
	const char *good[] = {"ak", "ak_live", "hm_test", "a1", "abcdefghijklmnopqrstuvwx", "a_b_c"};
	const char *bad[] = {"", "a", "1a", "_ak", "ak_", "Ak", "ak-live", "ak live",
	"abcdefghijklmnopqrstuvwxy", "ak\xc3\xa9"};

	for (size_t i = 0; i < sizeof(good) / sizeof(*good); i++)
		CHECK(token_prefix_valid(good[i], strlen(good[i])), "prefix %s should be valid", good[i]);
	for (size_t i = 0; i < sizeof(bad) / sizeof(*bad); i++)
		CHECK(!token_prefix_valid(bad[i], strlen(bad[i])), "prefix #%zu should be invalid", i);
}

/* Generated tokens parse and differ. */
static void
test_generated_tokens(void)
{
	long		counts[62] = {0};
	long		total = 0;
	double		chi2 = 0;
	int			shape_ok = 1;

	for (int n = 0; n < 20000; n++)
	{
		char		t[TOKEN_MAX_LEN + 1];
		size_t		len = token_generate("ak_live", 7, t);
		size_t		plen = 0;

		t[len] = '\0';
		if (len != 7 + 1 + 32 + 6 || memcmp(t, "ak_live_", 8) != 0 ||
			token_parse(t, len, &plen) != TOKEN_OK || plen != 7)
			shape_ok = 0;
		for (size_t i = 8; i < 8 + 32; i++)
		{
			const char *p = strchr(alphabet, t[i]);

			if (p == NULL || t[i] == '\0')
				shape_ok = 0;
			else
				counts[p - alphabet]++, total++;
		}
	}
	CHECK(shape_ok, "every generated token has length 46, the prefix, base62 secret and valid check");

	/*
	 * Uniformity: 640,000 draws over 62 symbols.  A modulo-biased generator
	 * (byte % 62) draws the first 8 symbols a quarter more often and scores a
	 * chi-square near 4,200; a fair one scores about 61 (the bound 140 fails
	 * by chance with probability below 1e-7).
	 */
	for (int i = 0; i < 62; i++)
	{
		double		expect = (double) total / 62;

		chi2 += (counts[i] - expect) * (counts[i] - expect) / expect;
	}
	CHECK(chi2 < 140.0, "secret characters are uniform (chi-square %.1f)", chi2);
}

/* No single-character substitution of a valid token parses. */
static void
test_single_substitutions(void)
{
	int			undetected = 0;
	int			tried = 0;

	for (int n = 0; n < 200; n++)
	{
		char		t[TOKEN_MAX_LEN + 1];
		size_t		len = token_generate("ak_test", 7, t);

		t[len] = '\0';
		for (size_t i = 0; i < len; i++)
		{
			char		orig = t[i];

			for (int c = 1; c < 128; c++)
			{
				if (c == orig)
					continue;
				t[i] = (char) c;
				tried++;
				if (parses(t))
					undetected++;
			}
			t[i] = orig;
		}
	}
	CHECK(tried > 0 && undetected == 0, "%d of %d single-character substitutions went undetected",
		  undetected, tried);
}

/* Malformed tokens are refused with the right error. */
static void
test_malformed(void)
{
	char		t[TOKEN_MAX_LEN + 2];
	size_t		len = token_generate("ak_live", 7, t);
	size_t		plen;
	int			truncations_caught = 1;

	t[len] = '\0';
	for (size_t cut = 0; cut < len; cut++)
		if (token_parse(t, cut, &plen) == TOKEN_OK)
			truncations_caught = 0;
	CHECK(truncations_caught, "every truncation is rejected");

	CHECK(token_parse(t, 40, &plen) == TOKEN_TOO_SHORT, "too short");
	CHECK(token_parse("abcdefghijklmnopqrstuvwxyz_0000000000000000000000000000000000000000", 66, &plen) == TOKEN_TOO_LONG, "too long");
	CHECK(token_parse("ak_live-000000000000000000000000000000004YzvZp", 46, &plen) == TOKEN_NO_SEPARATOR, "no separator");
	CHECK(token_parse("Ak_live_000000000000000000000000000000004YzvZp", 46, &plen) == TOKEN_BAD_PREFIX, "bad prefix");
	CHECK(token_parse("ak_live_00000000000000000000000000000-004YzvZp", 46, &plen) == TOKEN_BAD_SECRET_CHAR, "bad secret char");
	CHECK(token_parse("ak_live_000000000000000000000000000000004Yzv_p", 46, &plen) == TOKEN_BAD_CHECK_CHAR, "bad check char");
	CHECK(token_parse("ak_live_000000000000000000000000000000014YzvZp", 46, &plen) == TOKEN_BAD_CHECKSUM, "bad checksum");
	CHECK(token_parse("ak_live_0000000000000000\0000000000000004YzvZp", 46, &plen) != TOKEN_OK, "embedded NUL");
}

/* Runs every test; exits non-zero on a failure. */
int
main(void)
{
	if (sodium_init() < 0)
	{
		printf("libsodium failed to initialise\n");
		return 1;
	}
	test_known_vectors();
	test_prefix_rules();
	test_generated_tokens();
	test_single_substitutions();
	test_malformed();
	printf("%d passed, %d failed\n", passed, failed);
	return failed == 0 ? 0 : 1;
}
