// Files kiln writes for people (the CLI's fused models and graphs, KILN_DUMP's kernel files): each
// is written whole into a temp file beside its name and renamed over it, so a full disk or a crash
// leaves the old file as it was. Only a missing name or a regular file is written: a symlink there
// is never followed (nor replaced), a device or FIFO never touched. The kernel cache keeps its own
// writer (its own file format and temp names).
#pragma once

#include <sys/types.h>

#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace kiln {

// Writes `contents` as `path`: a new temp file in path's directory (O_CREAT | O_EXCL | O_NOFOLLOW,
// mode 0600), every write checked, fsync'd when `sync`, given its final mode (an existing file's,
// else 0666 less the umask), closed and checked, then renamed over `path`. A `path` that is a
// symlink, directory, device, FIFO or socket is refused and left as it is. Returns "" on success,
// else one line naming the file and the reason ("cannot write out.pt: No space left on device");
// `path` is then as it was and the temp file is gone.
std::string writeFileAtomically(const std::string& path, const std::string& contents,
                                bool sync = true);

// The steps writeFileAtomically and the kernel cache share: `pieces`, in order, written whole into
// a new file at the first free name `temp_name(attempt)` gives (attempts 0 .. attempts-1; O_CREAT |
// O_EXCL | O_NOFOLLOW, mode 0600), fsync'd when `sync`, given `mode`, closed and renamed over
// `path`, every step checked. On failure the temp file is gone and the result says which step
// failed (creating the temp file, or writing it into place) and errno.
struct ReplaceResult {
  enum Step { kDone, kCreate, kWrite } failed_at = kDone;
  int error = 0;
  explicit operator bool() const { return failed_at == kDone; }
};
ReplaceResult writeTempAndRename(const std::string& path, const std::function<std::string(int)>& temp_name,
                                 int attempts, const std::vector<std::string_view>& pieces, bool sync,
                                 mode_t mode);

}  // namespace kiln
