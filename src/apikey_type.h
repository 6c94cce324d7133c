/*
 * apikey_type.h — the apikeys.apikey base type: a well-formed token, stored
 * as a varlena of its text (binary-compatible with text).
 */
#ifndef APIKEY_TYPE_H
#define APIKEY_TYPE_H

#include "postgres.h"

/*
 * Raises 22P02 unless the len bytes at str are a well-formed token; never
 * puts any part of the input in the error.  Returns the prefix length.
 */
extern size_t apikey_check_input(const char *str, size_t len);

#endif							/* APIKEY_TYPE_H */
