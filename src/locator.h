/*
 * locator.h — where each key's row was last found, in shared memory
 * (library preloaded only), so that verify can skip the digest index.
 */
#ifndef APIKEYS_LOCATOR_H
#define APIKEYS_LOCATOR_H

#include "postgres.h"

#include "port/atomics.h"
#include "storage/itemptr.h"

/* One digest's place in the locator: its line of slots and its tag. */
typedef struct LocatorProbe
{
	pg_atomic_uint64 *line;		/* NULL: no locator (no preload) */
	uint64		tag;
} LocatorProbe;

/* Reserves the locator (from _PG_init, preload only). */
extern void locator_init(void);

/*
 * Finds the line and tag of a digest (its first 8 bytes are used) of
 * relation relid in this database, and asks the CPU to fetch the line;
 * without a locator, a probe that finds nothing.
 */
extern void locator_start(Oid relid, const unsigned char *digest, LocatorProbe *probe);

/* The row last recorded for the probe's digest, if any: a hint to check, never an answer. */
extern bool locator_get(const LocatorProbe *probe, ItemPointer tid);

/* Records where the probe's digest was found (the HOT chain's root, as the index holds it). */
extern void locator_put(const LocatorProbe *probe, ItemPointer tid);

#endif							/* APIKEYS_LOCATOR_H */
