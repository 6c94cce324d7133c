/*
 * locator.c — where each key's row was last found, so that verify can read
 * the row without probing the digest index.
 *
 * A shared array of 64-byte lines of eight 8-byte slots; a digest's line
 * and 16-bit tag come from its first bytes mixed with the database and the
 * relation.  A slot holds a tag and the heap TID (the root of the row's HOT
 * chain, as the index holds it) where that digest's row was found last.
 * Slots are read and written atomically and without locks: what one says is
 * only a hint, which verify checks against the row itself (the snapshot
 * must see it and its digest must be the token's) before using it, and on
 * any doubt it probes the index, which then records the row.  So a stale
 * slot, or another digest's, costs a wasted read, never a wrong answer, and
 * nothing needs invalidating.
 */
#include "postgres.h"

#include "common/hashfn.h"
#include "miscadmin.h"
#include "port/pg_bitutils.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"

#include "apikeys.h"
#include "locator.h"
#include "usage.h"

/* Slots a line holds: 8 of 8 bytes fill one 64-byte cache line. */
#define LOCATOR_WAYS 8

/* Where in a slot the tag, block and offset are. */
#define SLOT_TAG_SHIFT 48
#define SLOT_BLOCK_SHIFT 16

static pg_atomic_uint64 *locator_slots = NULL;
static uint32 locator_line_mask;
/* Counts this backend's evictions, to vary the way a new digest takes in a full line. */
static uint32 evictions = 0;
static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* Lines: a power of two with at least one slot per key the usage table tracks. */
static uint32
locator_line_count(void)
{
	return pg_nextpower2_32((uint32) (usage_max_tracked_keys() / LOCATOR_WAYS + 1));
}

/* Reserves the slots (postmaster). */
static void
locator_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	/* One more line's worth, to align the array on a cache line. */
	RequestAddinShmemSpace(mul_size(locator_line_count() + 1,
									LOCATOR_WAYS * sizeof(pg_atomic_uint64)));
}

/* Attaches to (or creates and empties) the slots. */
static void
locator_shmem_startup(void)
{
	bool		found;
	char	   *base;
	uint32		slots = locator_line_count() * LOCATOR_WAYS;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	base = ShmemInitStruct("apikeys row locator",
						   mul_size(locator_line_count() + 1,
									LOCATOR_WAYS * sizeof(pg_atomic_uint64)),
						   &found);
	locator_slots = (pg_atomic_uint64 *) TYPEALIGN(PG_CACHE_LINE_SIZE, base);
	locator_line_mask = locator_line_count() - 1;
	if (!found)
		for (uint32 i = 0; i < slots; i++)
			pg_atomic_init_u64(&locator_slots[i], 0);
	LWLockRelease(AddinShmemInitLock);
}

/* Reserves the locator (from _PG_init, preload only). */
void
locator_init(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = locator_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = locator_shmem_startup;
}

/*
 * Finds the digest's line and tag (a digest is uniformly random, so its
 * first bytes serve; the database and relation are mixed in, so that their
 * keys spread alike, while the check against the row keeps a slot of
 * another's from answering) and asks the CPU to fetch the line.
 */
void
locator_start(Oid relid, const unsigned char *digest, LocatorProbe *probe)
{
	uint64		bits;
	uint32		salt;

	probe->line = NULL;
	if (locator_slots == NULL)
		return;
	memcpy(&bits, digest, sizeof(bits));
	salt = hash_combine(murmurhash32((uint32) MyDatabaseId), murmurhash32((uint32) relid));
	probe->line = &locator_slots[(((uint32) bits ^ salt) & locator_line_mask) * LOCATOR_WAYS];
	probe->tag = ((bits >> 32) ^ salt) & 0xFFFF;
	prefetch_line(probe->line);
}

/* The row last recorded for the probe's digest, if any: a hint to check, never an answer. */
bool
locator_get(const LocatorProbe *probe, ItemPointer tid)
{
	if (probe->line == NULL)
		return false;
	for (int way = 0; way < LOCATOR_WAYS; way++)
	{
		uint64		slot = pg_atomic_read_u64(&probe->line[way]);

		/* An empty slot is 0; a used one has an offset of at least 1. */
		if (slot != 0 && slot >> SLOT_TAG_SHIFT == probe->tag)
		{
			ItemPointerSet(tid, (BlockNumber) (slot >> SLOT_BLOCK_SHIFT),
						   (OffsetNumber) (slot & 0xFFFF));
			return true;
		}
	}
	return false;
}

/*
 * Records where the probe's digest was found: in the slot with its tag,
 * else an empty one, else one taken from another digest.
 */
void
locator_put(const LocatorProbe *probe, ItemPointer tid)
{
	int			empty = -1;
	int			way;

	if (probe->line == NULL)
		return;

	/*
	 * Read, then written without a compare-and-swap: two backends may both
	 * take a way, or one may overwrite the other's.  That only costs a later
	 * lookup a probe of the index.
	 */
	for (way = 0; way < LOCATOR_WAYS; way++)
	{
		uint64		held = pg_atomic_read_u64(&probe->line[way]);

		if (held != 0 && held >> SLOT_TAG_SHIFT == probe->tag)
			break;
		if (held == 0 && empty < 0)
			empty = way;
	}
	if (way == LOCATOR_WAYS)
		way = empty >= 0 ? empty : (int) ((probe->tag + evictions++) % LOCATOR_WAYS);
	pg_atomic_write_u64(&probe->line[way], probe->tag << SLOT_TAG_SHIFT |
						(uint64) ItemPointerGetBlockNumber(tid) << SLOT_BLOCK_SHIFT |
						ItemPointerGetOffsetNumber(tid));
}
