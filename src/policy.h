/*
 * policy.h — per-plan policies that verify() applies: the usage-alert
 * threshold of an owner's plan, cached per backend.
 */
#ifndef APIKEYS_POLICY_H
#define APIKEYS_POLICY_H

#include "postgres.h"

/*
 * The alert threshold of the owner's plan (apikeys.plans.
 * alert_requests_per_minute), or -1 when the plan sets none.
 */
extern int32 policy_alert_threshold(Datum owner);

#endif							/* APIKEYS_POLICY_H */
