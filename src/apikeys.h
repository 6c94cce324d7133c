/*
 * apikeys.h — module-wide settings (GUCs) and load state.
 */
#ifndef APIKEYS_H
#define APIKEYS_H

#include "postgres.h"

/* GUC apikeys.default_prefix: prefix for keys created without one. */
extern char *apikeys_default_prefix;

#endif							/* APIKEYS_H */
