/*
 * credits.h — keys' credit balances in shared memory (library preloaded
 * only): verify spends there, the worker writes what was spent.
 */
#ifndef APIKEYS_CREDITS_H
#define APIKEYS_CREDITS_H

#include "postgres.h"

#include "nodes/pg_list.h"
#include "utils/snapshot.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

/* A key's refill period: none, a UTC day, a UTC month. */
typedef enum CreditRefill
{
	REFILL_NONE = 0,
	REFILL_DAY,
	REFILL_MONTH
} CreditRefill;

/* The credit columns of a key's row. */
typedef struct CreditRow
{
	int64		credits;		/* balance as written; < 0: no credit limit */
	int64		refill_amount;	/* 0 without refill */
	CreditRefill refill;
	int32		period;			/* the period credits belongs to */
	int64		gen;			/* bumped by every change but the worker's */
	bool		own;			/* set by the current transaction (inserted, or a new generation) */
} CreditRow;

/* Reads a key's credit columns with a snapshot; false if the key is gone. */
typedef bool (*CreditRowReader) (void *arg, Snapshot snapshot, CreditRow *row);

typedef enum CreditOutcome
{
	CREDITS_SPENT,				/* cost spent (or the key turned out unlimited) */
	CREDITS_EXCEEDED,			/* fewer credits than cost: nothing spent */
	CREDITS_REFUSED,			/* none can be spent here (standby, no room) */
	CREDITS_NEED_READER			/* the balance must be (re)loaded: call again with a reader */
} CreditOutcome;

/* What one database's worker subtracts from apikeys.keys.credits. */
typedef struct CreditDelta
{
	struct CreditEntry *entry;	/* taken from; stays put while its spending is in flight */
	pg_uuid_t	key_id;
	int64		spent;			/* negative when refunds outweigh spending */
	CreditRefill refill;		/* the refill the spending was made under */
	int32		period;
	bool		written;		/* set by the flush: false if the row was locked */
} CreditDelta;

/* Defines the credit settings and, with the preload, reserves the table (from _PG_init). */
extern void credits_init(void);

/* The refill period (UTC days or months since 1970; 0 without refill) of a moment. */
extern int32 credit_period(CreditRefill refill, TimestampTz at);

/*
 * Spends cost credits of a key whose row (as the caller's snapshot sees it)
 * is row, unless it has fewer left; *remaining is what it has left after
 * (-1: the key has no credit limit after all) and *period the period spent
 * in, for credits_refund().  reader reads the row's latest version when
 * the balance must be (re)loaded from the table; without one (NULL), that
 * case returns CREDITS_NEED_READER having changed nothing, so that the
 * caller opens the table only when it is read.
 */
extern CreditOutcome credits_spend(const pg_uuid_t *key_id, Oid relid, const CreditRow *row,
								   int64 cost, CreditRowReader reader, void *reader_arg,
								   int64 *remaining, int32 *period);

/*
 * Prefetching for the hot path, two steps apart like usage's: the
 * fast-index slot of a key's balance as soon as the key is known, then the
 * balance that slot names once the slot has had time to arrive.  Hints only.
 */
extern void credits_prefetch_slot(const pg_uuid_t *key_id);
extern void credits_prefetch_entry(void);

/* Gives back what credits_spend() took, when the request was refused after all. */
extern void credits_refund(const pg_uuid_t *key_id, int32 period, int64 cost, int64 *remaining);

/* Takes a database's unwritten spending for the flush transaction xid; returns how many. */
extern int	credits_take_pending(Oid dboid, Oid relid, TransactionId xid, CreditDelta **out);

/*
 * Before the flush transaction xid commits: takes back the spending it
 * could not write (deltas not written), so that "xid committed" means "the
 * column holds it".
 */
extern void credits_take_back_unwritten(TransactionId xid, const CreditDelta *deltas, int n);

/* After the flush transaction xid committed: forgets the spending it wrote. */
extern void credits_flush_done(TransactionId xid, const CreditDelta *deltas, int n);

/* Forgets every balance of a database that is gone. */
extern void credits_discard(Oid dboid);

/* Adds the databases with spending to write to a list of OIDs (no duplicates). */
extern List *credits_databases_with_spending(List *dboids);

/* Whether the database has spending to write. */
extern bool credits_has_pending(Oid dboid);

#endif							/* APIKEYS_CREDITS_H */
