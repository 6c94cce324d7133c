/*
 * policy.c — what an owner's plan sets for verify(): the usage-alert
 * threshold and the owner-wide rate limit.
 *
 * A key without its own threshold takes its plan's, and every key counts
 * against its plan's rate_limit.  Looking those up costs two index probes,
 * so each backend caches them per owner, and does not look at all while no
 * plan sets either (the usual case, checked once).  A statement trigger on
 * plans and owners (apikeys._policy_changed) sends a relcache invalidation
 * for its table at commit, and every backend then forgets what it cached.
 * Lookups read the latest committed rows, after the invalidations that
 * opening the tables accepts, so a change is never missed.
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/table.h"
#include "access/tableam.h"
#include "catalog/namespace.h"
#include "catalog/pg_collation.h"
#include "commands/trigger.h"
#include "common/hashfn.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"

#include <sodium.h>

#include "policy.h"

/* Owners cached per backend before the cache starts over. */
#define POLICY_CACHE_MAX	10000

/*
 * Keyed by a pointer to the owner's text (a copy in policy_cxt), compared
 * by value: entries stay small, so that the lookup on every verify() touches
 * little memory, whatever the owner's length.
 */
typedef struct OwnerPolicyEntry
{
	text	   *owner;			/* hash key */
	OwnerPolicy policy;
} OwnerPolicyEntry;

typedef enum PlansState
{
	PLANS_UNKNOWN,
	PLANS_WITHOUT_POLICIES,
	PLANS_WITH_POLICIES
} PlansState;

/* What a plan that sets nothing, or no plan, means. */
static const OwnerPolicy no_policy = {-1, 0, {{0}}};

static PlansState plans_state = PLANS_UNKNOWN;
/* Counts resets, so that a lookup can tell one happened while it read. */
static uint64 policy_resets = 0;
static HTAB *owner_policies = NULL;
/* Holds owner_policies and its keys' texts; reset with it. */
static MemoryContext policy_cxt = NULL;
static Oid	owners_relid = InvalidOid;
static Oid	plans_relid = InvalidOid;
static bool callback_registered = false;

/* Forgets everything cached. */
static void
policy_reset(void)
{
	plans_state = PLANS_UNKNOWN;
	policy_resets++;
	owner_policies = NULL;
	if (policy_cxt != NULL)
		MemoryContextReset(policy_cxt);
}

/* Hashes an owner_policies key: the owner's text. */
static uint32
owner_key_hash(const void *key, Size keysize)
{
	const text *owner = *(text *const *) key;

	return DatumGetUInt32(hash_any((const unsigned char *) VARDATA_ANY(owner),
								   VARSIZE_ANY_EXHDR(owner)));
}

/* Compares two owner_policies keys by their texts' bytes (0 when equal). */
static int
owner_key_match(const void *key1, const void *key2, Size keysize)
{
	const text *a = *(text *const *) key1;
	const text *b = *(text *const *) key2;
	Size		len = VARSIZE_ANY_EXHDR(a);

	return len == VARSIZE_ANY_EXHDR(b) && memcmp(VARDATA_ANY(a), VARDATA_ANY(b), len) == 0 ? 0 : 1;
}

/* A change to plans or owners (or to any relation, InvalidOid) resets the cache. */
static void
policy_relcache_callback(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == owners_relid || relid == plans_relid)
	{
		policy_reset();
		owners_relid = InvalidOid;
		plans_relid = InvalidOid;
	}
}

/* Finds apikeys.owners and apikeys.plans; false if this database lacks them. */
static bool
policy_relations(void)
{
	Oid			nsp;

	if (!callback_registered)
	{
		CacheRegisterRelcacheCallback(policy_relcache_callback, (Datum) 0);
		callback_registered = true;
	}
	if (OidIsValid(owners_relid) && OidIsValid(plans_relid))
		return true;
	nsp = get_namespace_oid("apikeys", true);
	if (!OidIsValid(nsp))
		return false;
	owners_relid = get_relname_relid("owners", nsp);
	plans_relid = get_relname_relid("plans", nsp);
	return OidIsValid(owners_relid) && OidIsValid(plans_relid);
}

/* An integer column of the slot's row; -1 when NULL or the schema lacks it. */
static int32
int_column(TupleTableSlot *slot, AttrNumber attnum)
{
	bool		isnull = true;
	Datum		value = attnum > 0 ? slot_getattr(slot, attnum, &isnull) : (Datum) 0;

	return isnull ? -1 : DatumGetInt32(value);
}

/*
 * The policy of the plan named plan_name; or, when plan_name is NULL,
 * whether any plan sets one.  Returns false when none is found.  plans is
 * read by the OID given: opening it may accept an invalidation that
 * forgets the cached one.
 */
static bool
plan_policy(Oid relid, Snapshot snapshot, Datum plan_name, OwnerPolicy *policy)
{
	Relation	plans = table_open(relid, AccessShareLock);
	AttrNumber	att_name = get_attnum(relid, "name");
	AttrNumber	att_threshold = get_attnum(relid, "alert_requests_per_minute");
	AttrNumber	att_rate_limit = get_attnum(relid, "rate_limit");
	bool		found = false;

	*policy = no_policy;
	/* A 1.0 schema has no policies on plans. */
	if (att_threshold > 0 && att_name > 0)
	{
		TableScanDesc scan = table_beginscan(plans, snapshot, 0, NULL);
		TupleTableSlot *slot = table_slot_create(plans, NULL);

		while (table_scan_getnextslot(scan, ForwardScanDirection, slot))
		{
			bool		isnull;
			OwnerPolicy row;

			CHECK_FOR_INTERRUPTS();
			row.alert_threshold = int_column(slot, att_threshold);
			row.rate_limit = Max(int_column(slot, att_rate_limit), 0);
			if (plan_name == (Datum) 0)
			{
				if (row.alert_threshold < 0 && row.rate_limit == 0)
					continue;
				found = true;
				break;
			}
			if (DatumGetBool(DirectFunctionCall2Coll(texteq, DEFAULT_COLLATION_OID,
													 slot_getattr(slot, att_name, &isnull),
													 plan_name)))
			{
				*policy = row;
				found = true;
				break;
			}
		}
		table_endscan(scan);
		ExecDropSingleTupleTableSlot(slot);
	}
	table_close(plans, NoLock);
	return found;
}

/*
 * The policy of the owner's plan, read from the tables (by the OIDs given,
 * as in plan_policy()), with the owner's id when it limits.
 */
static OwnerPolicy
lookup_owner_policy(Oid relid, Oid plans, Snapshot snapshot, Datum owner)
{
	Relation	owners = table_open(relid, AccessShareLock);
	Oid			indexid = get_relname_relid("owners_pkey", get_rel_namespace(relid));
	AttrNumber	att_plan = get_attnum(relid, "plan");
	OwnerPolicy result = no_policy;

	if (OidIsValid(indexid) && att_plan > 0)
	{
		Relation	index = index_open(indexid, AccessShareLock);
		TupleTableSlot *slot = table_slot_create(owners, NULL);
		IndexScanDesc scan;
		ScanKeyData skey;

		ScanKeyEntryInitialize(&skey, 0, 1, BTEqualStrategyNumber, InvalidOid,
							   index->rd_indcollation[0], F_TEXTEQ, owner);
		scan = index_beginscan(owners, index, snapshot, 1, 0);
		index_rescan(scan, &skey, 1, NULL, 0);
		if (index_getnext_slot(scan, ForwardScanDirection, slot))
		{
			bool		isnull;
			Datum		plan = slot_getattr(slot, att_plan, &isnull);

			if (!isnull)
				(void) plan_policy(plans, snapshot, plan, &result);
		}
		index_endscan(scan);
		ExecDropSingleTupleTableSlot(slot);
		index_close(index, NoLock);
	}
	table_close(owners, NoLock);
	if (result.rate_limit > 0)
	{
		text	   *t = DatumGetTextPP(owner);

		crypto_generichash(result.owner_id.data, UUID_LEN, (const unsigned char *) VARDATA_ANY(t),
						   VARSIZE_ANY_EXHDR(t), NULL, 0);
	}
	return result;
}

/* See policy.h. */
OwnerPolicy
policy_for_owner(Datum owner)
{
	text	   *owner_text = DatumGetTextPP(owner);
	text	   *owner_copy;
	OwnerPolicyEntry *entry;
	Snapshot	snapshot;
	OwnerPolicy policy;
	bool		found;

	if (!policy_relations())
		return no_policy;

	/*
	 * Opening plans accepts pending invalidations, after the snapshot was
	 * taken: one accepted then may be of a change that snapshot missed (its
	 * commit waited for a lock on plans, say), so the answer is kept only if
	 * no reset came meanwhile, and sought again otherwise.
	 */
	while (plans_state == PLANS_UNKNOWN)
	{
		uint64		resets = policy_resets;
		PlansState	state;

		CHECK_FOR_INTERRUPTS();
		if (!policy_relations())
			return no_policy;
		snapshot = RegisterSnapshot(GetLatestSnapshot());
		state = plan_policy(plans_relid, snapshot, (Datum) 0, &policy)
			? PLANS_WITH_POLICIES : PLANS_WITHOUT_POLICIES;
		UnregisterSnapshot(snapshot);
		if (policy_resets == resets)
			plans_state = state;
	}
	if (plans_state != PLANS_WITH_POLICIES || !policy_relations())
		return no_policy;

	if (owner_policies != NULL)
	{
		entry = hash_search(owner_policies, &owner_text, HASH_FIND, NULL);
		if (entry != NULL)
			return entry->policy;
	}

	snapshot = RegisterSnapshot(GetLatestSnapshot());
	policy = lookup_owner_policy(owners_relid, plans_relid, snapshot, owner);
	UnregisterSnapshot(snapshot);

	/* The lookup may have accepted an invalidation that reset the cache. */
	if (plans_state != PLANS_WITH_POLICIES)
		return policy;
	if (owner_policies != NULL && hash_get_num_entries(owner_policies) >= POLICY_CACHE_MAX)
		policy_reset();
	if (owner_policies == NULL)
	{
		HASHCTL		ctl;

		if (policy_cxt == NULL)
			policy_cxt = AllocSetContextCreate(CacheMemoryContext, "apikeys owner policies",
											   ALLOCSET_DEFAULT_SIZES);
		ctl.keysize = sizeof(text *);
		ctl.entrysize = sizeof(OwnerPolicyEntry);
		ctl.hash = owner_key_hash;
		ctl.match = owner_key_match;
		ctl.hcxt = policy_cxt;
		owner_policies = hash_create("apikeys owner policies", 256, &ctl,
									 HASH_ELEM | HASH_FUNCTION | HASH_COMPARE | HASH_CONTEXT);
		plans_state = PLANS_WITH_POLICIES;
	}
	/*
	 * The key must outlive the caller's datum: a copy of the owner's text,
	 * made first, so that an out-of-memory error leaves no entry behind.
	 */
	owner_copy = MemoryContextAlloc(policy_cxt, VARHDRSZ + VARSIZE_ANY_EXHDR(owner_text));
	SET_VARSIZE(owner_copy, VARHDRSZ + VARSIZE_ANY_EXHDR(owner_text));
	memcpy(VARDATA(owner_copy), VARDATA_ANY(owner_text), VARSIZE_ANY_EXHDR(owner_text));
	entry = hash_search(owner_policies, &owner_copy, HASH_ENTER, &found);
	if (found)
		pfree(owner_copy);
	entry->policy = policy;
	return policy;
}

PG_FUNCTION_INFO_V1(apikeys_policy_changed);

/*
 * Statement trigger on apikeys.plans and apikeys.owners: every backend
 * forgets the policies it cached when the change commits.
 */
Datum
apikeys_policy_changed(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("apikeys._policy_changed() must be called as a trigger")));
	CacheInvalidateRelcache(trigdata->tg_relation);
	return PointerGetDatum(NULL);
}
