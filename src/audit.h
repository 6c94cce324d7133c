/*
 * audit.h — audit records that must survive the caller's rollback.
 */
#ifndef APIKEYS_AUDIT_H
#define APIKEYS_AUDIT_H

#include "postgres.h"

#include "utils/uuid.h"

/*
 * Queues a verify_failed record: per key when the token matched one (key_id
 * and owner non-NULL), else per prefix (NULL for a malformed token).
 * A no-op without the preload or on a standby.
 */
extern void audit_record_verify_failure(const pg_uuid_t *key_id, const char *owner,
										const char *prefix, size_t prefix_len,
										int reason_code);

/*
 * Queues a usage_alert (audit row and NOTIFY apikeys_alert) for a key that
 * passed apikeys.alert_requests_per_minute, and wakes the worker.
 */
extern void audit_record_usage_alert(const pg_uuid_t *key_id, const char *owner,
									 const char *start, int64 requests, int32 threshold);

#endif							/* APIKEYS_AUDIT_H */
