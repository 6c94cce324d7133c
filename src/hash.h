/*
 * hash.h — the audit log's hash chain: BLAKE2b-256 over the previous row's
 * hash and the row's canonical encoding.
 */
#ifndef APIKEYS_HASH_H
#define APIKEYS_HASH_H

#define AUDIT_HASH_LEN 32

#endif							/* APIKEYS_HASH_H */
