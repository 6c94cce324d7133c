/*
 * policy.c — the usage-alert threshold of an owner's plan, for verify().
 *
 * A key without its own threshold takes its plan's.  Looking that up costs
 * two index probes, so each backend caches it per owner, and does not look at
 * all while no plan sets a threshold (the usual case, checked once).  A
 * statement trigger on plans and owners (apikeys._policy_changed) sends a
 * relcache invalidation for its table at commit, and every backend then
 * forgets what it cached.  Lookups read the latest committed rows, after the
 * invalidations that opening the tables accepts, so a change is never missed.
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/table.h"
#include "access/tableam.h"
#include "catalog/namespace.h"
#include "catalog/pg_collation.h"
#include "commands/trigger.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"

#include "policy.h"

/* Owners longer than this (the table allows 200 characters) are not cached. */
#define POLICY_OWNER_LEN	(200 * MAX_MULTIBYTE_CHAR_LEN + 1)
/* Owners cached per backend before the cache starts over. */
#define POLICY_CACHE_MAX	10000

typedef struct OwnerThreshold
{
	char		owner[POLICY_OWNER_LEN];	/* hash key, NUL-terminated */
	int32		threshold;		/* -1: the plan sets none */
} OwnerThreshold;

typedef enum PlansState
{
	PLANS_UNKNOWN,
	PLANS_WITHOUT_THRESHOLDS,
	PLANS_WITH_THRESHOLDS
} PlansState;

static PlansState plans_state = PLANS_UNKNOWN;
static HTAB *owner_thresholds = NULL;
static Oid	owners_relid = InvalidOid;
static Oid	plans_relid = InvalidOid;
static bool callback_registered = false;

/* Forgets everything cached. */
static void
policy_reset(void)
{
	plans_state = PLANS_UNKNOWN;
	if (owner_thresholds != NULL)
	{
		hash_destroy(owner_thresholds);
		owner_thresholds = NULL;
	}
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

/*
 * The threshold of the plan named plan_name (-1: none), or of every plan
 * when plan_name is NULL: then 1 if any plan sets one, else -1.
 */
static int32
plan_threshold(Snapshot snapshot, Datum plan_name)
{
	Relation	plans = table_open(plans_relid, AccessShareLock);
	AttrNumber	att_name = get_attnum(plans_relid, "name");
	AttrNumber	att_threshold = get_attnum(plans_relid, "alert_requests_per_minute");
	int32		result = -1;

	/* A 1.0 schema has no thresholds on plans. */
	if (att_threshold > 0 && att_name > 0)
	{
		TableScanDesc scan = table_beginscan(plans, snapshot, 0, NULL);
		TupleTableSlot *slot = table_slot_create(plans, NULL);

		while (table_scan_getnextslot(scan, ForwardScanDirection, slot))
		{
			bool		isnull;
			Datum		threshold;

			CHECK_FOR_INTERRUPTS();
			threshold = slot_getattr(slot, att_threshold, &isnull);
			if (isnull)
				continue;
			if (plan_name == (Datum) 0)
			{
				result = 1;
				break;
			}
			if (DatumGetBool(DirectFunctionCall2Coll(texteq, DEFAULT_COLLATION_OID,
													 slot_getattr(slot, att_name, &isnull),
													 plan_name)))
			{
				result = DatumGetInt32(threshold);
				break;
			}
		}
		table_endscan(scan);
		ExecDropSingleTupleTableSlot(slot);
	}
	table_close(plans, NoLock);
	return result;
}

/* The threshold of the owner's plan, read from the tables (-1: none). */
static int32
lookup_owner_threshold(Snapshot snapshot, Datum owner)
{
	Relation	owners = table_open(owners_relid, AccessShareLock);
	Oid			indexid = get_relname_relid("owners_pkey", get_rel_namespace(owners_relid));
	AttrNumber	att_plan = get_attnum(owners_relid, "plan");
	int32		result = -1;

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
				result = plan_threshold(snapshot, plan);
		}
		index_endscan(scan);
		ExecDropSingleTupleTableSlot(slot);
		index_close(index, NoLock);
	}
	table_close(owners, NoLock);
	return result;
}

/* See policy.h. */
int32
policy_alert_threshold(Datum owner)
{
	text	   *owner_text = DatumGetTextPP(owner);
	int			len = VARSIZE_ANY_EXHDR(owner_text);
	char		key[POLICY_OWNER_LEN];
	OwnerThreshold *entry;
	Snapshot	snapshot;
	int32		threshold;
	bool		found;

	if (!policy_relations())
		return -1;

	/* Opening the tables below accepts pending invalidations first. */
	if (plans_state == PLANS_UNKNOWN)
	{
		snapshot = RegisterSnapshot(GetLatestSnapshot());
		plans_state = plan_threshold(snapshot, (Datum) 0) > 0
			? PLANS_WITH_THRESHOLDS : PLANS_WITHOUT_THRESHOLDS;
		UnregisterSnapshot(snapshot);
	}
	if (plans_state != PLANS_WITH_THRESHOLDS)
		return -1;

	if (len >= POLICY_OWNER_LEN)
	{
		snapshot = RegisterSnapshot(GetLatestSnapshot());
		threshold = lookup_owner_threshold(snapshot, owner);
		UnregisterSnapshot(snapshot);
		return threshold;
	}
	memcpy(key, VARDATA_ANY(owner_text), len);
	key[len] = '\0';

	if (owner_thresholds != NULL)
	{
		entry = hash_search(owner_thresholds, key, HASH_FIND, NULL);
		if (entry != NULL)
			return entry->threshold;
	}

	snapshot = RegisterSnapshot(GetLatestSnapshot());
	threshold = lookup_owner_threshold(snapshot, owner);
	UnregisterSnapshot(snapshot);

	/* The lookup may have accepted an invalidation that reset the cache. */
	if (plans_state != PLANS_WITH_THRESHOLDS)
		return threshold;
	if (owner_thresholds != NULL && hash_get_num_entries(owner_thresholds) >= POLICY_CACHE_MAX)
		policy_reset();
	if (owner_thresholds == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = POLICY_OWNER_LEN;
		ctl.entrysize = sizeof(OwnerThreshold);
		ctl.hcxt = CacheMemoryContext;
		owner_thresholds = hash_create("apikeys owner thresholds", 256, &ctl,
									   HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
		plans_state = PLANS_WITH_THRESHOLDS;
	}
	entry = hash_search(owner_thresholds, key, HASH_ENTER, &found);
	entry->threshold = threshold;
	return threshold;
}

PG_FUNCTION_INFO_V1(apikeys_policy_changed);

/*
 * Statement trigger on apikeys.plans and apikeys.owners: every backend
 * forgets the thresholds it cached when the change commits.
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
