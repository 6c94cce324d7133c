/*
 * verify.h — the verification hot path behind verify() and authenticate().
 */
#ifndef APIKEYS_VERIFY_H
#define APIKEYS_VERIFY_H

#include "postgres.h"

typedef enum VerifyCode
{
	VERIFY_VALID = 0,
	VERIFY_INVALID,
	VERIFY_REVOKED,
	VERIFY_EXPIRED,
	VERIFY_INSUFFICIENT_SCOPE,
	VERIFY_RATE_LIMITED,
	VERIFY_DISABLED,			/* 1.1 */
	VERIFY_IP_NOT_ALLOWED,		/* 1.1 */
	VERIFY_USAGE_EXCEEDED		/* 1.1 */
} VerifyCode;

/* The code's text as verify() returns it, e.g. "API_KEY_REVOKED". */
extern const char *verify_code_name(VerifyCode code);

#endif							/* APIKEYS_VERIFY_H */
