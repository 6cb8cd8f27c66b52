// writeFileAtomically: temp file + rename in the target's directory, every step checked.
#include "codegen/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>

namespace kiln {
namespace {

// Room left in a 255-byte file name for ".NAME.PID.SALT.N.tmp" around a long target name.
constexpr size_t kMaxTempStem = 180;

// The process's umask without changing it (umask() is set-and-return, racy across threads).
mode_t currentUmask() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("Umask:", 0) == 0)
      return static_cast<mode_t>(std::strtoul(line.c_str() + 6, nullptr, 8));
  }
  return 022;
}

bool writeFully(int fd, const char* data, size_t size) {
  while (size > 0) {
    ssize_t n = write(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return false;
    if (n == 0) {
      errno = EIO;
      return false;
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

}  // namespace

ReplaceResult writeTempAndRename(const std::string& path, const std::function<std::string(int)>& temp_name,
                                 int attempts, const std::vector<std::string_view>& pieces, bool sync,
                                 mode_t mode) {
  std::string temp_path;
  int fd = -1;
  for (int attempt = 0; attempt < attempts && fd < 0; ++attempt) {
    temp_path = temp_name(attempt);
    fd = open(temp_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0 && errno != EEXIST) break;
  }
  if (fd < 0) return {ReplaceResult::kCreate, errno};
  bool ok = true;
  for (std::string_view piece : pieces) ok = ok && writeFully(fd, piece.data(), piece.size());
  ok = ok && (!sync || fsync(fd) == 0) && fchmod(fd, mode) == 0;
  int error = ok ? 0 : errno;
  if (close(fd) != 0 && ok) {
    ok = false;
    error = errno;
  }
  // rename() replaces the name atomically: readers see the old file or the new one.
  if (ok && rename(temp_path.c_str(), path.c_str()) != 0) {
    ok = false;
    error = errno;
  }
  if (ok) return {};
  unlink(temp_path.c_str());
  return {ReplaceResult::kWrite, error};
}

std::string writeFileAtomically(const std::string& path, const std::string& contents, bool sync) {
  auto failure = [&path](const std::string& reason) {
    return "cannot write " + path + ": " + reason;
  };
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "."
                          : slash == 0               ? "/"
                                                     : path.substr(0, slash);
  const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  if (name.empty() || name == "." || name == "..") return failure(std::strerror(EISDIR));

  // What is at the name now decides the final mode, and whether it may be replaced at all. Only a
  // regular file is: a symlink is neither written through (it may have been planted to point at
  // a victim) nor replaced (/dev/stdout is one, and root could swap it for a file); a device or
  // FIFO (/dev/full) is somebody else's.
  mode_t mode = 0666 & ~currentUmask();
  struct stat st;
  if (lstat(path.c_str(), &st) == 0) {
    if (S_ISLNK(st.st_mode)) return failure("a symbolic link, not followed (name its target)");
    if (S_ISDIR(st.st_mode)) return failure(std::strerror(EISDIR));
    if (!S_ISREG(st.st_mode)) return failure("not a regular file (a device, FIFO or socket)");
    mode = st.st_mode & 0777;
  } else if (errno != ENOENT) {
    return failure(std::strerror(errno));
  }

  static const uint64_t process_salt = std::random_device{}();
  static std::atomic<uint64_t> counter{0};
  auto temp_name = [&](int) {
    return dir + "/." + name.substr(0, kMaxTempStem) + "." + std::to_string(getpid()) + "." +
           std::to_string(process_salt % 1000000) + "." + std::to_string(counter.fetch_add(1)) + ".tmp";
  };
  ReplaceResult result = writeTempAndRename(path, temp_name, 8, {contents}, sync, mode);
  if (!result) return failure(std::strerror(result.error));
  if (sync) {
    // The rename itself reaches the disk with the directory; some filesystems refuse to fsync a
    // directory (EINVAL), and the file is in place either way, so this one is best effort.
    int dir_fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir_fd >= 0) {
      fsync(dir_fd);
      close(dir_fd);
    }
  }
  return "";
}

}  // namespace kiln
