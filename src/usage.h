/*
 * usage.h — per-key usage counters and rate limits in shared memory
 * (library preloaded only).
 */
#ifndef APIKEYS_USAGE_H
#define APIKEYS_USAGE_H

#include "postgres.h"

#include "nodes/pg_list.h"
#include "storage/itemptr.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

typedef enum UsageOutcome
{
	USAGE_ALLOWED,				/* counted as a request */
	USAGE_RATE_LIMITED,			/* counted as a failure */
	USAGE_UNTRACKED				/* no room: neither counted nor limited */
} UsageOutcome;

/* Counts of one key and day: pending in shared memory, in flight, or to write. */
typedef struct UsageCounts
{
	int64		requests;
	int64		failures;
	TimestampTz last_used_at;	/* 0 when no request */
} UsageCounts;

struct UsageEntry;

/* What one database's worker moves to apikeys.key_usage. */
typedef struct UsageDelta
{
	struct UsageEntry *entry;	/* taken from; stays put while its counts are in flight */
	pg_uuid_t	key_id;
	int32		day;			/* days since 1970-01-01, UTC */
	UsageCounts counts;
	/* In: where the key's row was written last, a hint that may be stale (or invalid); out: where the direct write put it. */
	ItemPointerData row;
} UsageDelta;

/* Defines the usage settings and, with the preload, reserves the table (from _PG_init). */
extern void usage_init(void);

/* apikeys.max_tracked_keys: keys counted at once (the row locator sizes itself by it). */
extern int	usage_max_tracked_keys(void);

/* What a rate-limited key has left, for verify()'s ratelimit_* columns. */
typedef struct UsageLimit
{
	bool		applies;		/* false: no limit, or not tracked */
	int32		limit;			/* requests per minute of the limit this describes */
	int32		remaining;		/* requests that would pass right now */
	TimestampTz reset;			/* remaining 0: when the next one passes; else when all are back */
} UsageLimit;

/*
 * Counts a verification that would return VALID, enforcing rate_limit
 * (<= 0: none) with rate_burst requests of burst (< 0: rate_limit - 1) by
 * the generic cell rate algorithm, and the owner's owner_rate_limit (<= 0:
 * none; owner_id identifies the owner) across its keys, and fills in
 * *limit with the tighter.  *alert_threshold
 * is the key's (or its plan's) threshold, or -1 for
 * apikeys.alert_requests_per_minute, which it then becomes.  When this
 * request passes the threshold for the first time this minute,
 * *alert_requests is the minute's requests; else 0.
 */
extern UsageOutcome usage_count_request(const pg_uuid_t *key_id, int32 rate_limit,
										int32 rate_burst, const pg_uuid_t *owner_id,
										int32 owner_rate_limit, int32 *alert_threshold,
										int64 *alert_requests, UsageLimit *limit);

/*
 * Prefetching for the hot path, two steps apart: the fast-index slots of a
 * key's entry for today (and of its rate-limit entry, when rate_limited) as
 * soon as the key is known, then the entries those slots name once the
 * slots have had time to arrive.  Hints only.
 */
extern void usage_prefetch_slot(const pg_uuid_t *key_id, bool rate_limited);
extern void usage_prefetch_entry(void);

/* Counts a refusal of a key that exists (revoked, expired, scope). */
extern void usage_count_failure(const pg_uuid_t *key_id);

/*
 * Takes every pending delta of a database for the flush transaction xid (in
 * one pass, into a palloc'd array) and forgets idle keys; returns how many.
 * Until usage_flush_done(), readers add the taken counts unless they see
 * xid committed; if xid never commits, the next call takes them again.
 * Only the database's worker calls it.
 */
extern int	usage_take_pending(Oid dboid, TransactionId xid, UsageDelta **out);

/* After the flush transaction xid committed: forget the deltas it took, and keep where each row now is. */
extern void usage_flush_done(TransactionId xid, const UsageDelta *deltas, int n);

/* Forgets every count of a database that is gone. */
extern void usage_discard(Oid dboid);

/* Adds the databases that have counts to write to a list of OIDs (no duplicates). */
extern List *usage_databases_with_counts(List *dboids);

/* Whether the database has counts waiting to be written.  Caller may hold no lock. */
extern bool usage_has_pending(Oid dboid);

/* Keys tracked now, and how many could not be tracked since start. */
extern void usage_stats(int64 *tracked, int64 *untracked);

#endif							/* APIKEYS_USAGE_H */
