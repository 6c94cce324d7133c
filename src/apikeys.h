/*
 * apikeys.h — module-wide settings (GUCs), load state and a prefetch hint.
 */
#ifndef APIKEYS_H
#define APIKEYS_H

#include "postgres.h"

/* Asks the CPU to start fetching the cache line at p (a hint: p may be anywhere). */
static inline void
prefetch_line(const void *p)
{
#if defined(__GNUC__) || defined(__clang__)
	__builtin_prefetch(p);
#else
	(void) p;
#endif
}

/* GUC apikeys.default_prefix: prefix for keys created without one. */
extern char *apikeys_default_prefix;

#endif							/* APIKEYS_H */
