/*
 * verify.c — verify() and authenticate().
 *
 * A token is parsed and its checksum checked before any table is read, so
 * malformed input costs no I/O; a well-formed one costs a read of its row
 * where the row locator recorded it, or one probe of the digest index.
 * Nothing here writes a table row (counters live in shared memory), so
 * verification works in read-only transactions and on hot standbys.
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/hash.h"
#include "access/xlog.h"
#include "access/table.h"
#include "access/tableam.h"
#include "catalog/namespace.h"
#include "catalog/pg_am.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/bufmgr.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/fmgroids.h"
#include "utils/inet.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/snapmgr.h"

#include <sys/socket.h>
#include <sodium.h>

#include "audit.h"
#include "credits.h"
#include "launcher.h"
#include "locator.h"
#include "policy.h"
#include "token.h"
#include "usage.h"
#include "verify.h"

/* What a lookup found, copied into the caller's memory context. */
/* Scopes a key holds, and scopes a verification requires, at most. */
#define APIKEYS_MAX_SCOPES 64
/* The most credits one verification may cost. */
#define APIKEYS_MAX_COST 1000000

typedef struct FoundKey
{
	Datum		id;
	Datum		owner;
	Datum		name;
	Datum		start;
	Datum		scopes;
	Datum		metadata;
	Datum		expires_at;
	bool		expires_null;
	int32		rate_limit;		/* 0: none */
	int32		rate_burst;		/* -1: the default, rate_limit - 1 */
	int32		alert_threshold;	/* the key's own; -1: its plan's */
	bool		revoked;
	bool		disabled;
	ArrayType  *allowed_ips;	/* NULL: any address */
	CreditRow	credit;			/* credit.credits < 0: no credit limit */
	bool		written_here;	/* this version by this transaction, so it may yet roll back */
} FoundKey;

/* What a verification spent and has left, for the credits_remaining column. */
typedef struct CreditResult
{
	bool		applies;		/* the key has a credit limit and was checked */
	int64		remaining;
	bool		spent;			/* cost was taken from shared memory */
	int32		period;
	int64		cost;
} CreditResult;

/*
 * Column numbers of apikeys.keys that 1.0 created; a 1.0 install and an
 * upgraded one share them (upgrades only append columns).
 */
#define KEYS_ATT_ID			1
#define KEYS_ATT_OWNER		2
#define KEYS_ATT_NAME		3
#define KEYS_ATT_START		5
#define KEYS_ATT_DIGEST		6
#define KEYS_ATT_SCOPES		7
#define KEYS_ATT_METADATA	8
#define KEYS_ATT_RATE_LIMIT	9
#define KEYS_ATT_EXPIRES_AT	12
#define KEYS_ATT_REVOKED_AT	13

/* The code's text as verify() returns it, e.g. "API_KEY_REVOKED". */
const char *
verify_code_name(VerifyCode code)
{
	switch (code)
	{
		case VERIFY_VALID:
			return "VALID";
		case VERIFY_INVALID:
			return "API_KEY_INVALID";
		case VERIFY_REVOKED:
			return "API_KEY_REVOKED";
		case VERIFY_EXPIRED:
			return "API_KEY_EXPIRED";
		case VERIFY_INSUFFICIENT_SCOPE:
			return "INSUFFICIENT_SCOPE";
		case VERIFY_RATE_LIMITED:
			return "RATE_LIMITED";
		case VERIFY_DISABLED:
			return "API_KEY_DISABLED";
		case VERIFY_IP_NOT_ALLOWED:
			return "IP_NOT_ALLOWED";
		case VERIFY_USAGE_EXCEEDED:
			return "USAGE_EXCEEDED";
	}
	return "API_KEY_INVALID";
}

/* OIDs of apikeys.keys and its digest index, looked up once per backend. */
static Oid	cached_keys_relid = InvalidOid;
static Oid	cached_digest_indexid = InvalidOid;
static Oid	cached_pkey_indexid = InvalidOid;
static bool relcache_callback_registered = false;

/*
 * Column numbers of the columns 1.1 added, looked up by name with the OIDs:
 * InvalidAttrNumber while the database's schema is still 1.0, so one library
 * serves both.
 */
static AttrNumber att_disabled_at = InvalidAttrNumber;
static AttrNumber att_allowed_ips = InvalidAttrNumber;
static AttrNumber att_alert_threshold = InvalidAttrNumber;
static AttrNumber att_rate_burst = InvalidAttrNumber;
static AttrNumber att_credits = InvalidAttrNumber;
static AttrNumber att_refill_amount = InvalidAttrNumber;
static AttrNumber att_refill_interval = InvalidAttrNumber;
static AttrNumber att_credits_period = InvalidAttrNumber;
static AttrNumber att_credits_gen = InvalidAttrNumber;

/* Any change to either relation (ALTER EXTENSION UPDATE, a drop) forgets them. */
static void
forget_keys_relation(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == cached_keys_relid || relid == cached_digest_indexid ||
		relid == cached_pkey_indexid)
	{
		cached_keys_relid = InvalidOid;
		cached_digest_indexid = InvalidOid;
		cached_pkey_indexid = InvalidOid;
	}
}

/* The column's number, or InvalidAttrNumber when this schema version lacks it. */
static AttrNumber
keys_column(Oid relid, const char *name)
{
	AttrNumber	attnum = get_attnum(relid, name);

	return attnum > 0 ? attnum : InvalidAttrNumber;
}

/* The OIDs of apikeys.keys and its digest index, looked up once per backend. */
static void
keys_relation_oids(Oid *relid, Oid *indexid)
{
	if (!OidIsValid(cached_keys_relid) || !OidIsValid(cached_digest_indexid))
	{
		Oid			nsp = get_namespace_oid("apikeys", false);
		Oid			heap = get_relname_relid("keys", nsp);
		Oid			index = get_relname_relid("keys_digest_hash", nsp);
		Oid			pkey = get_relname_relid("keys_pkey", nsp);

		/* A 1.0 schema has only the unique B-tree, which serves as well. */
		if (!OidIsValid(index))
			index = get_relname_relid("keys_digest_key", nsp);

		if (!OidIsValid(heap) || !OidIsValid(index) || !OidIsValid(pkey))
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_TABLE),
					 errmsg("apikeys.keys or its digest index is missing")));
		if (!relcache_callback_registered)
		{
			CacheRegisterRelcacheCallback(forget_keys_relation, (Datum) 0);
			relcache_callback_registered = true;
		}
		att_disabled_at = keys_column(heap, "disabled_at");
		att_allowed_ips = keys_column(heap, "allowed_ips");
		att_alert_threshold = keys_column(heap, "alert_requests_per_minute");
		att_rate_burst = keys_column(heap, "rate_burst");
		att_credits = keys_column(heap, "credits");
		att_refill_amount = keys_column(heap, "credits_refill_amount");
		att_refill_interval = keys_column(heap, "credits_refill_interval");
		att_credits_period = keys_column(heap, "credits_period");
		att_credits_gen = keys_column(heap, "credits_gen");
		cached_keys_relid = heap;
		cached_digest_indexid = index;
		cached_pkey_indexid = pkey;
	}
	*relid = cached_keys_relid;
	*indexid = cached_digest_indexid;
}

/*
 * The result row's descriptor: the one a FROM clause's function scan built
 * for the function's row type (the usual SELECT * FROM verify(...)), else
 * one built once per call site.
 */
static TupleDesc
result_tupdesc(FunctionCallInfo fcinfo)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	TupleDesc	tupdesc = (TupleDesc) fcinfo->flinfo->fn_extra;

	if (rsinfo != NULL && IsA(rsinfo, ReturnSetInfo) && rsinfo->expectedDesc != NULL &&
		rsinfo->expectedDesc->tdtypeid != RECORDOID)
		return rsinfo->expectedDesc;
	if (tupdesc == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(fcinfo->flinfo->fn_mcxt);

		if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
			elog(ERROR, "return type must be a row type");
		tupdesc = BlessTupleDesc(CreateTupleDescCopy(tupdesc));
		fcinfo->flinfo->fn_extra = tupdesc;
		MemoryContextSwitchTo(old);
	}
	return tupdesc;
}

/* A copy of one column of the slot's tuple, outliving the scan. */
static Datum
copy_attr(TupleTableSlot *slot, AttrNumber attnum, bool *isnull)
{
	Form_pg_attribute att = TupleDescAttr(slot->tts_tupleDescriptor, attnum - 1);
	Datum		value = slot_getattr(slot, attnum, isnull);

	return *isnull ? (Datum) 0 : datumCopy(value, att->attbyval, att->attlen);
}

/* The credit columns of a key's row (credits < 0: no limit, or a 1.0 schema). */
static void
read_credit_columns(TupleTableSlot *slot, CreditRow *row)
{
	bool		isnull = true;
	Datum		value;

	memset(row, 0, sizeof(CreditRow));
	row->credits = -1;
	if (att_credits == InvalidAttrNumber)
		return;
	value = slot_getattr(slot, att_credits, &isnull);
	if (isnull)
		return;
	row->credits = DatumGetInt64(value);
	value = slot_getattr(slot, att_refill_amount, &isnull);
	row->refill_amount = isnull ? 0 : DatumGetInt64(value);
	value = slot_getattr(slot, att_refill_interval, &isnull);
	if (!isnull && row->refill_amount > 0)
	{
		text	   *interval = DatumGetTextPP(value);

		row->refill = VARSIZE_ANY_EXHDR(interval) == 3 &&
			memcmp(VARDATA_ANY(interval), "day", 3) == 0 ? REFILL_DAY : REFILL_MONTH;
	}
	row->period = DatumGetInt32(slot_getattr(slot, att_credits_period, &isnull));
	row->gen = DatumGetInt64(slot_getattr(slot, att_credits_gen, &isnull));
}

/* What credits_spend()'s reader reads with: relations opened and locked beforehand. */
typedef struct CreditReader
{
	Relation	heap;
	Relation	pkey;
	Datum		key_id;
} CreditReader;

static bool read_credits_before(void *arg, Snapshot snapshot, CreditRow *before);

/* Opens (and locks) what a CreditReader reads, for the key key_id. */
static void
reader_open(CreditReader *reader, Datum key_id)
{
	Oid			relid;
	Oid			indexid;
	Oid			pkey;

	keys_relation_oids(&relid, &indexid);
	pkey = cached_pkey_indexid;	/* before opening: that may accept invalidations */
	reader->heap = table_open(relid, AccessShareLock);
	reader->pkey = index_open(pkey, AccessShareLock);
	reader->key_id = key_id;
}

/* Closes what reader_open() opened; the locks are kept to the end of the transaction. */
static void
reader_close(CreditReader *reader)
{
	index_close(reader->pkey, NoLock);
	table_close(reader->heap, NoLock);
}

/*
 * credits_spend()'s reader: a key's credit columns as the snapshot sees
 * its row, found by id through the primary key.  It runs under a partition
 * lock of the credits table, so it opens and locks nothing: the caller did.
 * A version this transaction wrote is its own balance (row->own) only if
 * the transaction set the credits: a key it inserted, or a new generation.
 */
static bool
read_latest_credits(void *arg, Snapshot snapshot, CreditRow *row)
{
	CreditReader *r = (CreditReader *) arg;
	TupleTableSlot *slot = table_slot_create(r->heap, NULL);
	IndexScanDesc scan = index_beginscan(r->heap, r->pkey, snapshot, 1, 0);
	ScanKeyData skey;
	bool		exists;

	ScanKeyInit(&skey, 1, BTEqualStrategyNumber, F_UUID_EQ, r->key_id);
	index_rescan(scan, &skey, 1, NULL, 0);
	exists = index_getnext_slot(scan, ForwardScanDirection, slot);
	if (exists)
	{
		bool		isnull;

		read_credit_columns(slot, row);
		row->own = false;
		if (TransactionIdIsCurrentTransactionId(
			DatumGetTransactionId(slot_getsysattr(slot, MinTransactionIdAttributeNumber, &isnull))))
		{
			CreditRow	before;

			row->own = !read_credits_before(arg, snapshot, &before) || before.gen != row->gen;
		}
	}
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(slot);
	return exists;
}

/*
 * The key's credit columns as the snapshot would show its row without any
 * of this transaction's commands: none of the versions it wrote, and each
 * one it replaced.  False when this transaction inserted the key.
 */
static bool
read_credits_before(void *arg, Snapshot snapshot, CreditRow *before)
{
	SnapshotData pre_transaction = *snapshot;

	pre_transaction.curcid = FirstCommandId;
	return read_latest_credits(arg, &pre_transaction, before);
}

/*
 * Whether this transaction inserted the key, rather than updated one that
 * existed before it.  *before gets the credit columns of the version it
 * replaced, when there is one.
 */
static bool
key_inserted_here(FoundKey *key, CreditRow *before)
{
	Snapshot	snapshot = ActiveSnapshotSet() ? GetActiveSnapshot() : GetTransactionSnapshot();
	CreditReader reader;
	bool		existed;

	reader_open(&reader, key->id);
	existed = read_credits_before(&reader, snapshot, before);
	reader_close(&reader);
	return !existed;
}

/* Whether the row's digest is the token's (the hash index's matches are not exact). */
static bool
digest_matches(TupleTableSlot *slot, const unsigned char *digest)
{
	bool		isnull;
	bytea	   *stored = DatumGetByteaPP(slot_getattr(slot, KEYS_ATT_DIGEST, &isnull));

	return !isnull && VARSIZE_ANY_EXHDR(stored) == TOKEN_DIGEST_LEN &&
		memcmp(VARDATA_ANY(stored), digest, TOKEN_DIGEST_LEN) == 0;
}

/*
 * The row at tid (the root of a HOT chain) that the snapshot sees, if it
 * holds the digest.  tid comes from the locator and may be stale: a vacuum
 * may since have truncated the table, but cannot while this lock is held.
 * The fetch moves tid to the version found, which must not be recorded.
 */
static bool
fetch_located(Relation heap, ItemPointer tid, Snapshot snapshot, TupleTableSlot *slot,
			  const unsigned char *digest)
{
	IndexFetchTableData *fetch;
	bool		call_again = false;
	bool		all_dead = false;
	bool		found;

	if (ItemPointerGetBlockNumber(tid) >= RelationGetNumberOfBlocks(heap))
		return false;
	fetch = table_index_fetch_begin(heap);
	found = table_index_fetch_tuple(fetch, tid, snapshot, slot, &call_again, &all_dead) &&
		digest_matches(slot, digest);
	table_index_fetch_end(fetch);
	return found;
}

/*
 * One probe of the digest index (the hash index from 1.1, the unique B-tree
 * before) into slot; records in the locator the index entry (the HOT
 * chain's root) that led to the row.
 */
static bool
probe_index(Relation heap, Oid indexid, const unsigned char *digest, Snapshot snapshot,
			TupleTableSlot *slot, const LocatorProbe *probe)
{
	Relation	index = index_open(indexid, AccessShareLock);
	bytea	   *param = palloc(VARHDRSZ + TOKEN_DIGEST_LEN);
	IndexScanDesc scan;
	ScanKeyData skey;
	ItemPointerData root;
	bool		found = false;

	ItemPointerSetInvalid(&root);
	SET_VARSIZE(param, VARHDRSZ + TOKEN_DIGEST_LEN);
	memcpy(VARDATA(param), digest, TOKEN_DIGEST_LEN);
	ScanKeyInit(&skey, 1,
				index->rd_rel->relam == HASH_AM_OID ? HTEqualStrategyNumber : BTEqualStrategyNumber,
				F_BYTEAEQ, PointerGetDatum(param));
	scan = index_beginscan(heap, index, snapshot, 1, 0);
	index_rescan(scan, &skey, 1, NULL, 0);

	/*
	 * index_getnext_slot(), keeping the entry's TID: fetching the row moves
	 * xs_heaptid along the HOT chain.  A hash index returns every row whose
	 * digest has the same hash code.
	 */
	for (;;)
	{
		if (!scan->xs_heap_continue)
		{
			ItemPointer entry = index_getnext_tid(scan, ForwardScanDirection);

			if (entry == NULL)
				break;
			root = *entry;
		}
		if (index_fetch_heap(scan, slot) && digest_matches(slot, digest))
		{
			found = true;
			break;
		}
		CHECK_FOR_INTERRUPTS();
	}
	if (found)
		locator_put(probe, &root);

	index_endscan(scan);
	/* Locks are kept to the end of the transaction, as for any read. */
	index_close(index, NoLock);
	pfree(param);
	return found;
}

/*
 * The key row of the digest, read with the statement's snapshot: where the
 * locator says it was found last, else by a probe of the digest index.  It
 * reads the table directly rather than through SQL, so it costs no executor
 * set-up.  Returns false when no key has the digest.
 */
static bool
lookup_key(const unsigned char *digest, FoundKey *found)
{
	Oid			relid;
	Oid			indexid;
	Relation	heap;
	TupleTableSlot *slot;
	Snapshot	snapshot = ActiveSnapshotSet() ? GetActiveSnapshot() : GetTransactionSnapshot();
	LocatorProbe probe;
	ItemPointerData tid;
	bool		exists;

	keys_relation_oids(&relid, &indexid);
	/* The locator's line is on its way while the table is opened and locked. */
	locator_start(relid, digest, &probe);
	heap = table_open(relid, AccessShareLock);
	slot = table_slot_create(heap, NULL);
	exists = (locator_get(&probe, &tid) && fetch_located(heap, &tid, snapshot, slot, digest)) ||
		probe_index(heap, indexid, digest, snapshot, slot, &probe);
	if (exists)
	{
		bool		isnull;
		Datum		rate_limit;

		found->id = copy_attr(slot, KEYS_ATT_ID, &isnull);
		rate_limit = slot_getattr(slot, KEYS_ATT_RATE_LIMIT, &isnull);
		found->rate_limit = isnull ? 0 : DatumGetInt32(rate_limit);
		read_credit_columns(slot, &found->credit);
		/* The count's and the balance's memory, on its way while the rest of the row is read. */
		usage_prefetch_slot(DatumGetUUIDP(found->id), found->rate_limit > 0);
		if (found->credit.credits >= 0)
			credits_prefetch_slot(DatumGetUUIDP(found->id));
		found->owner = copy_attr(slot, KEYS_ATT_OWNER, &isnull);
		found->name = copy_attr(slot, KEYS_ATT_NAME, &isnull);
		found->start = copy_attr(slot, KEYS_ATT_START, &isnull);
		found->scopes = copy_attr(slot, KEYS_ATT_SCOPES, &isnull);
		found->metadata = copy_attr(slot, KEYS_ATT_METADATA, &isnull);
		found->expires_at = slot_getattr(slot, KEYS_ATT_EXPIRES_AT, &found->expires_null);
		(void) slot_getattr(slot, KEYS_ATT_REVOKED_AT, &isnull);
		found->revoked = !isnull;
		found->disabled = false;
		found->allowed_ips = NULL;
		found->alert_threshold = -1;
		found->rate_burst = -1;
		if (att_disabled_at != InvalidAttrNumber)
		{
			(void) slot_getattr(slot, att_disabled_at, &isnull);
			found->disabled = !isnull;
		}
		if (att_allowed_ips != InvalidAttrNumber)
		{
			Datum		ips = copy_attr(slot, att_allowed_ips, &isnull);

			if (!isnull)
				found->allowed_ips = DatumGetArrayTypeP(ips);
		}
		if (att_rate_burst != InvalidAttrNumber)
		{
			Datum		burst = slot_getattr(slot, att_rate_burst, &isnull);

			if (!isnull)
				found->rate_burst = DatumGetInt32(burst);
		}
		if (att_alert_threshold != InvalidAttrNumber)
		{
			Datum		threshold = slot_getattr(slot, att_alert_threshold, &isnull);

			if (!isnull)
				found->alert_threshold = DatumGetInt32(threshold);
		}
		found->written_here = TransactionIdIsCurrentTransactionId(
			DatumGetTransactionId(slot_getsysattr(slot, MinTransactionIdAttributeNumber, &isnull)));
	}

	ExecDropSingleTupleTableSlot(slot);
	table_close(heap, NoLock);
	return exists;
}

/* Text elements of a one-dimensional array, NULL elements skipped. */
static int
text_elements(ArrayType *array, text ***elements)
{
	Datum	   *datums;
	bool	   *nulls;
	int			n;
	int			kept = 0;

	deconstruct_array(array, TEXTOID, -1, false, TYPALIGN_INT, &datums, &nulls, &n);
	*elements = palloc(sizeof(text *) * Max(n, 1));
	for (int i = 0; i < n; i++)
		if (!nulls[i])
			(*elements)[kept++] = DatumGetTextPP(datums[i]);
	return kept;
}

/* "*" grants everything; "x:*" grants every scope starting "x:". */
static bool
scope_grants(text *held, text *wanted)
{
	const char *h = VARDATA_ANY(held);
	size_t		hlen = VARSIZE_ANY_EXHDR(held);
	const char *w = VARDATA_ANY(wanted);
	size_t		wlen = VARSIZE_ANY_EXHDR(wanted);

	if (hlen == 1 && h[0] == '*')
		return true;
	if (hlen == wlen && memcmp(h, w, hlen) == 0)
		return true;
	if (hlen >= 2 && h[hlen - 1] == '*' && h[hlen - 2] == ':')
		return wlen >= hlen - 1 && memcmp(h, w, hlen - 1) == 0;
	return false;
}

/* Whether the key's scopes grant every required one. */
static bool
scopes_satisfied(Datum held_scopes, ArrayType *required)
{
	text	  **held;
	text	  **wanted;
	int			nheld;
	int			nwanted;

	if (required == NULL || ArrayGetNItems(ARR_NDIM(required), ARR_DIMS(required)) == 0)
		return true;

	nwanted = text_elements(required, &wanted);
	nheld = text_elements(DatumGetArrayTypeP(held_scopes), &held);
	for (int i = 0; i < nwanted; i++)
	{
		bool		granted = false;

		CHECK_FOR_INTERRUPTS();
		for (int j = 0; j < nheld && !granted; j++)
			granted = scope_grants(held[j], wanted[i]);
		if (!granted)
			return false;
	}
	return true;
}

/*
 * Raises 22023 unless required_scopes is NULL or a one-dimensional array of
 * at most APIKEYS_MAX_SCOPES non-NULL elements.  The statement and its
 * context are kept out of the log: they may hold the token.
 */
static void
check_required_scopes(ArrayType *required)
{
	const char *problem = NULL;

	if (required == NULL)
		return;
	if (ARR_NDIM(required) > 1)
		problem = "required_scopes must be a one-dimensional array";
	else if (ArrayGetNItems(ARR_NDIM(required), ARR_DIMS(required)) > APIKEYS_MAX_SCOPES)
		problem = "required_scopes holds more than " CppAsString2(APIKEYS_MAX_SCOPES) " scopes";
	else if (array_contains_nulls(required))
		problem = "required_scopes must not contain null elements";
	if (problem != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s", problem),
				 errdetail("A call names at most %d scopes, each a non-null text.", APIKEYS_MAX_SCOPES),
				 errhidestmt(true),
				 errhidecontext(true)));
}

/*
 * Whether a key with an allow-list may be used from client_ip: it must be a
 * single host address inside one of the networks.  An unknown address
 * (NULL), or a network given in its place, never is: fail closed.
 */
static bool
address_allowed(ArrayType *allowed_ips, Datum client_ip, bool client_ip_null)
{
	inet	   *address;
	Datum	   *networks;
	bool	   *nulls;
	int			n;

	if (client_ip_null || ARR_ELEMTYPE(allowed_ips) != CIDROID)
		return false;
	address = DatumGetInetPP(client_ip);
	if (ip_bits(address) != ip_maxbits(address))
		return false;
	deconstruct_array(allowed_ips, CIDROID, -1, false, TYPALIGN_INT, &networks, &nulls, &n);
	for (int i = 0; i < n; i++)
	{
		CHECK_FOR_INTERRUPTS();
		if (!nulls[i] &&
			DatumGetBool(DirectFunctionCall2(network_subeq, PointerGetDatum(address), networks[i])))
			return true;
	}
	return false;
}

/* The verify code of a token, from its format and its key's row alone. */
static VerifyCode
decide(text *token, ArrayType *required, Datum client_ip, bool client_ip_null,
	   FoundKey *key, bool *found_key, size_t *prefix_len)
{
	unsigned char digest[TOKEN_DIGEST_LEN];

	*found_key = false;
	if (token == NULL ||
		token_parse(VARDATA_ANY(token), VARSIZE_ANY_EXHDR(token), prefix_len) != TOKEN_OK)
	{
		*prefix_len = 0;
		return VERIFY_INVALID;
	}

	token_digest(VARDATA_ANY(token), VARSIZE_ANY_EXHDR(token), digest);
	*found_key = lookup_key(digest, key);
	sodium_memzero(digest, sizeof(digest));
	if (!*found_key)
		return VERIFY_INVALID;

	if (key->revoked)
		return VERIFY_REVOKED;
	if (!key->expires_null &&
		DatumGetTimestampTz(key->expires_at) <= GetCurrentTransactionStartTimestamp())
		return VERIFY_EXPIRED;
	if (key->disabled)
		return VERIFY_DISABLED;
	if (key->allowed_ips != NULL &&
		!address_allowed(key->allowed_ips, client_ip, client_ip_null))
		return VERIFY_IP_NOT_ALLOWED;
	if (!scopes_satisfied(key->scopes, required))
		return VERIFY_INSUFFICIENT_SCOPE;
	return VERIFY_VALID;
}

/*
 * Checks and spends the key's credits for a verification that would pass.
 * Returns false (USAGE_EXCEEDED) when it has fewer than cost left; a
 * standby, a server without the preload, or a full table refuses any cost
 * but 0 (fail closed) and reports the written balance.  A balance this
 * transaction set (a key it created, or credits it changed) is checked
 * against its row alone and spends nothing: it may yet roll back.
 */
static bool
spend_credits(FoundKey *key, bool own_balance, int64 cost, CreditResult *credit)
{
	CreditRow  *row = &key->credit;
	int32		period = row->refill == REFILL_NONE ? 0 :
		credit_period(row->refill, GetCurrentTimestamp());
	int64		written = row->refill_amount > 0 && row->period < period
		? row->refill_amount : row->credits;
	CreditOutcome outcome;
	CreditReader reader;
	Oid			relid;
	Oid			indexid;

	credit->applies = true;
	credit->cost = cost;
	credit->remaining = written;
	if (own_balance || RecoveryInProgress())
		return cost == 0 || (own_balance && written >= cost);

	/*
	 * Cost 0 too: it reports what is left now, spending not yet written
	 * included.  A balance already in shared memory needs no table; one to
	 * (re)load is read through relations opened (and locked) here, before
	 * credits_spend() takes any lightweight lock.
	 */
	keys_relation_oids(&relid, &indexid);
	outcome = credits_spend(DatumGetUUIDP(key->id), relid, row, cost, NULL, NULL,
							&credit->remaining, &credit->period);
	if (outcome == CREDITS_NEED_READER)
	{
		reader_open(&reader, key->id);
		outcome = credits_spend(DatumGetUUIDP(key->id), relid, row, cost, read_latest_credits,
								&reader, &credit->remaining, &credit->period);
		reader_close(&reader);
	}
	/* Refused outright (no shared memory, no room): report the written balance. */
	if (outcome == CREDITS_REFUSED)
	{
		credit->remaining = written;
		return cost == 0;
	}
	credit->spent = outcome == CREDITS_SPENT && cost > 0 && credit->remaining >= 0;
	credit->applies = credit->remaining >= 0;
	return outcome == CREDITS_SPENT;
}

/*
 * The whole decision.  *found_key tells whether key holds a row; code is the
 * answer; *limit what the tighter rate limit has left, when one applied;
 * *credit what the key's credits have left.  Never raises for any token
 * text.  With the preload, a key that passes spends cost credits and is
 * counted and rate limited (its own limit and its plan's owner-wide one),
 * a refusal of a known key is counted, and every refusal is queued for the
 * audit log (per key when the token matched one, else per prefix).
 */
static VerifyCode
verify_token(text *token, ArrayType *required, Datum client_ip, bool client_ip_null, int64 cost,
			 FoundKey *key, bool *found_key, UsageLimit *limit, CreditResult *credit)
{
	size_t		prefix_len = 0;
	VerifyCode	code = decide(token, required, client_ip, client_ip_null, key, found_key,
							  &prefix_len);

	/*
	 * Counts and audit records name a key only if it will still exist when
	 * they are written: not a key this transaction created, which may roll
	 * back.  A key it only updated existed before, and is counted, limited
	 * and charged like any other, unless the update set its credits.
	 */
	CreditRow	before = {0};
	bool		inserted_here;
	bool		countable;
	bool		own_balance;
	OwnerPolicy policy;

	if (*found_key)
	{
		usage_prefetch_entry();
		credits_prefetch_entry();
	}
	inserted_here = *found_key && key->written_here &&
		key_inserted_here(key, &before);
	countable = *found_key && !inserted_here;
	own_balance = inserted_here ||
		(*found_key && key->written_here && before.gen != key->credit.gen);

	/*
	 * The owner's policy is looked up first: that may wait for a lock, and
	 * so be cancelled, and credits spent in shared memory are not given back
	 * by an error.  Nothing after the spending raises.
	 */
	if (code == VERIFY_VALID && countable)
		policy = policy_for_owner(key->owner);
	limit->applies = false;
	memset(credit, 0, sizeof(CreditResult));
	if (code == VERIFY_VALID && key->credit.credits >= 0 &&
		!spend_credits(key, own_balance, cost, credit))
		code = VERIFY_USAGE_EXCEEDED;
	if (code == VERIFY_VALID && countable)
	{
		int64		alert_requests;
		int32		alert_threshold;

		alert_threshold = key->alert_threshold >= 0 ? key->alert_threshold : policy.alert_threshold;
		if (usage_count_request(DatumGetUUIDP(key->id), key->rate_limit, key->rate_burst,
								&policy.owner_id, policy.rate_limit,
								&alert_threshold, &alert_requests, limit) == USAGE_RATE_LIMITED)
		{
			code = VERIFY_RATE_LIMITED;
			/* A refused request costs nothing. */
			if (credit->spent)
				credits_refund(DatumGetUUIDP(key->id), credit->period, credit->cost,
							   &credit->remaining);
		}
		if (alert_requests > 0)
			audit_record_usage_alert(DatumGetUUIDP(key->id), TextDatumGetCString(key->owner),
									 TextDatumGetCString(key->start), alert_requests,
									 alert_threshold);
	}
	else if (code != VERIFY_VALID && countable)
		usage_count_failure(DatumGetUUIDP(key->id));

	if (code != VERIFY_VALID)
		audit_record_verify_failure(countable ? DatumGetUUIDP(key->id) : NULL,
									countable ? TextDatumGetCString(key->owner) : NULL,
									prefix_len > 0 ? VARDATA_ANY(token) : NULL, prefix_len,
									(int) code);

	/*
	 * What was counted or spent waits in shared memory for the worker,
	 * whether or not the audit queue had room for a record (which would
	 * have called the worker too).
	 */
	if (countable)
		launcher_note_pending();
	return code;
}

/* Columns of verify_result and authenticate_result in 1.1; 1.0 has the first 8 and 5. */
#define VERIFY_RESULT_COLUMNS		12
#define AUTHENTICATE_RESULT_COLUMNS	9

/*
 * ratelimit_limit, ratelimit_remaining, ratelimit_reset and
 * credits_remaining: NULL unless a rate limit was applied (a refusal
 * before it, or a server without the preload, applies none), or the key's
 * credits were checked.
 */
static void
fill_limits(Datum *values, bool *nulls, bool found, UsageLimit *limit, CreditResult *credit)
{
	if (found && limit->applies)
	{
		values[0] = Int32GetDatum(limit->limit);
		values[1] = Int32GetDatum(limit->remaining);
		values[2] = TimestampTzGetDatum(limit->reset);
	}
	else
		nulls[0] = nulls[1] = nulls[2] = true;
	values[3] = Int64GetDatum(credit->remaining);
	nulls[3] = !found || !credit->applies || credit->remaining < 0;
}

/*
 * The cost argument: 0 to APIKEYS_MAX_COST credits (22023 otherwise; the
 * statement is kept out of the log, as it may hold the token).
 */
static int64
cost_argument(FunctionCallInfo fcinfo)
{
	int32		cost;

	if (PG_NARGS() < 4)
		return 1;
	if (PG_ARGISNULL(3) || (cost = PG_GETARG_INT32(3)) < 0 || cost > APIKEYS_MAX_COST)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("cost must be between 0 and %d", APIKEYS_MAX_COST),
				 errdetail("A verification spends that many of its key's credits."),
				 errhidestmt(true),
				 errhidecontext(true)));
	return cost;
}

PG_FUNCTION_INFO_V1(apikeys_verify);

/*
 * verify(token text, required_scopes text[], client_ip inet, cost integer)
 * returns (valid, code, key_id, owner, name, scopes, metadata, expires_at)
 * and, on a 1.1 schema, (ratelimit_limit, ratelimit_remaining,
 * ratelimit_reset, credits_remaining).  A refused key that exists still
 * reports which key it was.
 */
Datum
apikeys_verify(PG_FUNCTION_ARGS)
{
	text	   *token = PG_ARGISNULL(0) ? NULL : PG_GETARG_TEXT_PP(0);
	ArrayType  *required = PG_ARGISNULL(1) ? NULL : PG_GETARG_ARRAYTYPE_P(1);
	bool		client_ip_null = PG_NARGS() < 3 || PG_ARGISNULL(2);
	Datum		client_ip = client_ip_null ? (Datum) 0 : PG_GETARG_DATUM(2);
	TupleDesc	tupdesc;
	FoundKey	key;
	bool		found;
	VerifyCode	code;
	Datum		values[VERIFY_RESULT_COLUMNS];
	bool		nulls[VERIFY_RESULT_COLUMNS] = {false};
	UsageLimit	limit;
	CreditResult credit;
	int64		cost;

	tupdesc = result_tupdesc(fcinfo);
	check_required_scopes(required);
	cost = cost_argument(fcinfo);
	code = verify_token(token, required, client_ip, client_ip_null, cost, &key, &found, &limit,
						&credit);

	values[0] = BoolGetDatum(code == VERIFY_VALID);
	values[1] = CStringGetTextDatum(verify_code_name(code));
	if (found)
	{
		values[2] = key.id;
		values[3] = key.owner;
		values[4] = key.name;
		values[5] = key.scopes;
		values[6] = key.metadata;
		values[7] = key.expires_at;
		nulls[7] = key.expires_null;
	}
	else
		for (int i = 2; i < 8; i++)
			nulls[i] = true;
	/* A 1.0 schema's row type has none of the limits' columns. */
	if (tupdesc->natts >= VERIFY_RESULT_COLUMNS)
		fill_limits(values + 8, nulls + 8, found, &limit, &credit);

	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

PG_FUNCTION_INFO_V1(apikeys_authenticate);

/*
 * authenticate(token text, required_scopes text[], client_ip inet, cost
 * integer) returns (key_id, owner, name, scopes, metadata) and the limits'
 * columns, or raises 28000 whose message is the verify code.
 */
Datum
apikeys_authenticate(PG_FUNCTION_ARGS)
{
	text	   *token = PG_ARGISNULL(0) ? NULL : PG_GETARG_TEXT_PP(0);
	ArrayType  *required = PG_ARGISNULL(1) ? NULL : PG_GETARG_ARRAYTYPE_P(1);
	bool		client_ip_null = PG_NARGS() < 3 || PG_ARGISNULL(2);
	Datum		client_ip = client_ip_null ? (Datum) 0 : PG_GETARG_DATUM(2);
	TupleDesc	tupdesc;
	FoundKey	key;
	bool		found;
	VerifyCode	code;
	Datum		values[AUTHENTICATE_RESULT_COLUMNS];
	bool		nulls[AUTHENTICATE_RESULT_COLUMNS] = {false};
	UsageLimit	limit;
	CreditResult credit;
	int64		cost;

	tupdesc = result_tupdesc(fcinfo);
	check_required_scopes(required);
	cost = cost_argument(fcinfo);
	code = verify_token(token, required, client_ip, client_ip_null, cost, &key, &found, &limit,
						&credit);

	/* The failing statement's text, or a caller's in the context, may hold the token. */
	if (code != VERIFY_VALID)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
				 errmsg("%s", verify_code_name(code)),
				 errdetail("The API key was not accepted."),
				 errhidestmt(true),
				 errhidecontext(true)));

	values[0] = key.id;
	values[1] = key.owner;
	values[2] = key.name;
	values[3] = key.scopes;
	values[4] = key.metadata;
	if (tupdesc->natts >= AUTHENTICATE_RESULT_COLUMNS)
		fill_limits(values + 5, nulls + 5, found, &limit, &credit);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}
