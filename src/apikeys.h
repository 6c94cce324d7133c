/*
 * apikeys.h — module-wide settings (GUCs) and load state.
 */
#ifndef APIKEYS_H
#define APIKEYS_H

#include "postgres.h"

/* GUC apikeys.default_prefix: prefix for keys created without one. */
extern char *apikeys_default_prefix;

/* True when the library was loaded through shared_preload_libraries. */
extern bool apikeys_preloaded;

#endif							/* APIKEYS_H */
