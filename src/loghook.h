/*
 * loghook.h — keeps tokens out of the server log where PostgreSQL itself
 * would print them (library preloaded only).
 */
#ifndef APIKEYS_LOGHOOK_H
#define APIKEYS_LOGHOOK_H

/* The primary message of a malformed apikeys.apikey input (apikey_type.c). */
#define APIKEY_INPUT_ERROR_MESSAGE "invalid input syntax for type apikey"

/* Installs the emit_log_hook (from _PG_init, preload only). */
extern void loghook_init(void);

#endif							/* APIKEYS_LOGHOOK_H */
