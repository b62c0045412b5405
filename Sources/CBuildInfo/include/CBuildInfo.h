// The source commit a build was made from. `Scripts/stamp-source-commit` (run by Scripts/install and Scripts/demo)
// writes it into source_commit.h beside build_info.c (ignored by git); a build without that file says "unknown".
#ifndef CBUILDINFO_H
#define CBUILDINFO_H

/// The commit id (with "+changes" when the working tree differed from it), or "unknown".
const char *dl_source_commit(void);

#endif
