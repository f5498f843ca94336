#include "file_lock.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "fairdiff/error.h"

namespace fairdiff {

std::string FileLock::holder(const std::string& lock_path) {
  std::ifstream in(lock_path);
  std::string line;
  std::getline(in, line);
  return line;
}

FileLock::FileLock(const std::string& lock_path, const std::string& what, const std::string& hint) {
  fd_ = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0)
    throw Error(ErrorKind::Runtime, lock_path, std::string("cannot create the lock file: ") + std::strerror(errno),
                "check that the output folder is writable");
  int rc;
  do rc = ::flock(fd_, LOCK_EX | LOCK_NB);
  while (rc != 0 && errno == EINTR);
  if (rc != 0) {
    const int err = errno;
    if (err != EWOULDBLOCK) {
      spdlog::warn("{}: cannot lock ({}); running without the lock, so do not start this command twice",
                   lock_path, std::strerror(err));
      return;
    }
    ::close(fd_);
    fd_ = -1;
    // The holder writes its line just after locking; an empty line means it has only just started.
    const std::string who = holder(lock_path);
    throw_bad_input(what, "in use by " + (who.empty() ? std::string("another process") : who) + ", which holds " + lock_path,
                    hint);
  }
  char host[256] = {};
  if (::gethostname(host, sizeof host - 1) != 0) std::strcpy(host, "?");
  const std::string line = "pid " + std::to_string(::getpid()) + " on host " + host + "\n";
  // The lock itself is what matters; the line only names us in the other's error.
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, line.data(), line.size(), 0) != static_cast<ssize_t>(line.size()))
    spdlog::warn("{}: cannot write the holder's pid into the lock file", lock_path);
}

FileLock::~FileLock() {
  if (fd_ >= 0) ::close(fd_);  // closing the last descriptor drops the flock
}

}  // namespace fairdiff
