// An advisory lock that names its holder: one `fairdiff generate` per manifest at a time.
#pragma once

#include <string>

namespace fairdiff {

// flock(2) on `lock_path` (created when absent), taken at once or not at all, held until
// the object is destroyed or the process ends (the kernel drops it even after SIGKILL, so a
// killed run never leaves a stale lock). The holder writes "pid P on host H" into the
// file. When another process holds it, throws BadInput: "`what`: in use by pid P on host H,
// which holds `lock_path` (`hint`)". The file stays behind: removing it would let a third process lock a new file
// while the second still holds the old one. Where the file system has no flock (some
// Lustre mounts), logs one warning and runs unlocked.
class FileLock {
 public:
  FileLock(const std::string& lock_path, const std::string& what, const std::string& hint);
  ~FileLock();
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;

  // "pid P on host H", or "" when the file holds no holder line.
  static std::string holder(const std::string& lock_path);

 private:
  int fd_ = -1;
};

}  // namespace fairdiff
