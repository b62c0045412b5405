#include "CBuildInfo.h"

#if __has_include("source_commit.h")
#include "source_commit.h"
#endif

#ifndef DL_SOURCE_COMMIT
#define DL_SOURCE_COMMIT "unknown"
#endif

const char *dl_source_commit(void) { return DL_SOURCE_COMMIT; }
