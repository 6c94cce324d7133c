/*
 * loghook.h — keeps tokens out of the server log where PostgreSQL itself
 * would print them, and authenticate()'s refusals out of it altogether
 * (library preloaded only).
 */
#ifndef APIKEYS_LOGHOOK_H
#define APIKEYS_LOGHOOK_H

/* The primary message of a malformed apikeys.apikey input (apikey_type.c). */
#define APIKEY_INPUT_ERROR_MESSAGE "invalid input syntax for type apikey"

/* The C function whose 28000 reports are authenticate()'s refusals (verify.c). */
#define AUTHENTICATE_REFUSAL_FUNCTION "apikeys_authenticate"

/* What the context of an error raised while revoke_token() runs contains. */
#define REVOKE_TOKEN_CONTEXT "function apikeys.revoke_token(text,text)"

/* Installs the emit_log_hook (from _PG_init, preload only). */
extern void loghook_init(void);

#endif							/* APIKEYS_LOGHOOK_H */
