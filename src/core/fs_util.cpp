#include "fs_util.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "fairdiff/error.h"

namespace fairdiff {

std::string temporary_path(const std::string& path, const std::string& owner) {
  return path + ".tmp." + (owner.empty() ? "" : owner + ".") + std::to_string(::getpid());
}

AtomicFileWriter::AtomicFileWriter(const std::string& path, const std::string& owner)
    : path_(path), tmp_(temporary_path(path, owner)) {
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0)
    throw Error(ErrorKind::Runtime, path, std::string("cannot create file: ") + std::strerror(errno),
                "check that the folder exists and is writable");
}

AtomicFileWriter::~AtomicFileWriter() {
  if (fd_ < 0) return;
  ::close(fd_);
  ::unlink(tmp_.c_str());
}

void AtomicFileWriter::write(const void* data, size_t bytes) {
  const auto* p = static_cast<const char*>(data);
  size_t done = 0;
  while (done < bytes) {
    const ssize_t w = ::write(fd_, p + done, bytes - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw Error(ErrorKind::Runtime, path_, std::string("write failed: ") + std::strerror(errno),
                  "check free disk space");
    }
    done += static_cast<size_t>(w);
  }
}

void AtomicFileWriter::commit() {
  int why = ::fsync(fd_) == 0 ? 0 : errno;
  if (::close(fd_) != 0 && why == 0) why = errno;
  fd_ = -1;
  if (why != 0) {
    ::unlink(tmp_.c_str());
    throw Error(ErrorKind::Runtime, path_, std::string("flush failed: ") + std::strerror(why));
  }
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const std::string reason = std::strerror(errno);
    ::unlink(tmp_.c_str());
    throw Error(ErrorKind::Runtime, path_, "rename failed: " + reason);
  }
}

void write_file_atomic(const std::string& path, const std::string& contents, const std::string& owner) {
  AtomicFileWriter file(path, owner);
  file.write(contents.data(), contents.size());
  file.commit();
}

void append_line_durable(const std::string& path, const std::string& line) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) throw Error(ErrorKind::Runtime, path, std::string("cannot open for appending: ") + std::strerror(errno));
  struct stat st {};
  const off_t before = ::fstat(fd, &st) == 0 ? st.st_size : -1;
  const std::string text = line + "\n";  // one write: line and newline land together or not at all
  const ssize_t w = ::write(fd, text.data(), text.size());
  const int saved = w < 0 ? errno : 0;
  if (w != static_cast<ssize_t>(text.size())) {
    // A short write (the disk filled up) would leave a torn line: cut it off again.
    const bool cut = before >= 0 && ::ftruncate(fd, before) == 0 && ::fsync(fd) == 0;
    ::close(fd);
    const std::string what = w < 0 ? std::strerror(saved)
                                    : "wrote " + std::to_string(w) + " of " + std::to_string(text.size()) + " bytes";
    throw Error(ErrorKind::Runtime, path,
                "append failed: " + what + (cut ? "" : "; the torn line is repaired when the run is resumed"),
                "check free disk space, then rerun the same command to resume");
  }
  const bool synced = ::fsync(fd) == 0;
  const int sync_errno = errno;
  ::close(fd);
  if (!synced) throw Error(ErrorKind::Runtime, path, std::string("flush failed: ") + std::strerror(sync_errno), "check free disk space");
}

namespace {

// The pid of OWNER's temporary NAME (...tmp.<owner>.<digits>), or -1.
long temporary_pid(const std::string& name, const std::string& owner) {
  const std::string marker = ".tmp." + (owner.empty() ? "" : owner + ".");
  const size_t at = name.rfind(marker);
  if (at == std::string::npos) return -1;
  const std::string digits = name.substr(at + marker.size());
  if (digits.empty() || digits.size() > 9 || digits.find_first_not_of("0123456789") != std::string::npos) return -1;
  return std::stol(digits);
}

bool process_gone(long pid) {
  if (pid == static_cast<long>(::getpid())) return true;
  return pid > 0 && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;  // EPERM: alive, another user's
}

}  // namespace

int remove_stale_temporaries(const std::string& dir, const std::string& owner) {
  int removed = 0;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    const long pid = temporary_pid(e.path().filename().string(), owner);
    if (pid > 0 && e.is_regular_file(ec) && process_gone(pid)) removed += std::filesystem::remove(e.path(), ec) ? 1 : 0;
  }
  return removed;
}

std::string read_text_file(const std::string& path, const std::string& hint) {
  if (is_directory(path)) throw_bad_input(path, "is a folder, expected a file", hint);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw_bad_input(path, "file not found or not readable", hint);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool is_directory(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool is_regular_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

}  // namespace fairdiff
