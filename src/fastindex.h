/*
 * fastindex.h — a fast index in front of a shared hash table (usage
 * counters, credit balances): per slot, the address of the entry found
 * there last, or 0.  The caller maps a hash value to a slot that keeps the
 * partition's bits, so the partition's lock covers the slot; removing an
 * entry clears its slot, so a slot names a live entry or none.  An entry's
 * hash key is its first keysize bytes, as dynahash lays it out.
 */
#ifndef APIKEYS_FASTINDEX_H
#define APIKEYS_FASTINDEX_H

#include "postgres.h"

#include "port/atomics.h"
#include "utils/hsearch.h"

#include "apikeys.h"

/*
 * Finds an entry: the one slot names when its key is key, else the table's,
 * which slot then names.  Call with the entry's partition's lock held.
 */
static inline void *
fast_index_find(HTAB *table, pg_atomic_uint64 *slot, const void *key, Size keysize,
				uint32 hashvalue)
{
	void	   *e = (void *) (uintptr_t) pg_atomic_read_u64(slot);

	if (e != NULL && memcmp(e, key, keysize) == 0)
		return e;
	e = hash_search_with_hash_value(table, key, hashvalue, HASH_FIND, NULL);
	if (e != NULL)
		pg_atomic_write_u64(slot, (uint64) (uintptr_t) e);
	return e;
}

/*
 * Removes entry e from the table, and from slot if slot names it, so that
 * no slot names memory the table may reuse.  Call with the entry's
 * partition's lock held exclusively.
 */
static inline void
fast_index_remove(HTAB *table, pg_atomic_uint64 *slot, void *e, uint32 hashvalue)
{
	if (pg_atomic_read_u64(slot) == (uint64) (uintptr_t) e)
		pg_atomic_write_u64(slot, 0);
	hash_search_with_hash_value(table, e, hashvalue, HASH_REMOVE, NULL);
}

/*
 * Starts fetching the entry slot names: its first line and those at
 * offsets a and b, the lines the caller will read.  Without a lock: the
 * entry may be gone, and the fetch in vain.
 */
static inline void
fast_index_prefetch(pg_atomic_uint64 *slot, Size a, Size b)
{
	const char *e = (const char *) (uintptr_t) pg_atomic_read_u64(slot);

	if (e == NULL)
		return;
	prefetch_line(e);
	prefetch_line(e + a);
	prefetch_line(e + b);
}

#endif							/* APIKEYS_FASTINDEX_H */
