/*
 * policy.h — per-plan policies that verify() applies: the usage-alert
 * threshold and the owner-wide rate limit of an owner's plan, cached per
 * backend.
 */
#ifndef APIKEYS_POLICY_H
#define APIKEYS_POLICY_H

#include "postgres.h"

#include "utils/uuid.h"

typedef struct OwnerPolicy
{
	int32		alert_threshold;	/* apikeys.plans.alert_requests_per_minute; -1: none */
	int32		rate_limit;		/* apikeys.plans.rate_limit; 0: none */
	pg_uuid_t	owner_id;		/* with a rate_limit: the owner's 16-byte hash, naming its state */
} OwnerPolicy;

/* What the owner's plan sets (nothing for an owner without a row). */
extern OwnerPolicy policy_for_owner(Datum owner);

#endif							/* APIKEYS_POLICY_H */
