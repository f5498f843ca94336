#include "fs_util.h"

#include <fcntl.h>
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

void write_file_atomic(const std::string& path, const std::string& contents) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0)
    throw Error(ErrorKind::Runtime, path, std::string("cannot create file: ") + std::strerror(errno),
                "check that the folder exists and is writable");
  size_t done = 0;
  while (done < contents.size()) {
    ssize_t w = ::write(fd, contents.data() + done, contents.size() - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      const std::string why = std::strerror(errno);
      ::close(fd);
      ::unlink(tmp.c_str());
      throw Error(ErrorKind::Runtime, path, "write failed: " + why, "check free disk space");
    }
    done += static_cast<size_t>(w);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    ::unlink(tmp.c_str());
    throw Error(ErrorKind::Runtime, path, std::string("flush failed: ") + std::strerror(errno));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    ::unlink(tmp.c_str());
    throw Error(ErrorKind::Runtime, path, "rename failed: " + why);
  }
}

void append_line_durable(const std::string& path, const std::string& line) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) throw Error(ErrorKind::Runtime, path, std::string("cannot open for appending: ") + std::strerror(errno));
  const std::string text = line + "\n";
  const ssize_t w = ::write(fd, text.data(), text.size());
  const int saved = errno;
  const bool ok = w == static_cast<ssize_t>(text.size()) && ::fsync(fd) == 0;
  ::close(fd);
  if (!ok) throw Error(ErrorKind::Runtime, path, std::string("append failed: ") + std::strerror(saved), "check free disk space");
}

int remove_stale_temporaries(const std::string& dir) {
  int removed = 0;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec))
    if (e.is_regular_file() && e.path().filename().string().find(".tmp.") != std::string::npos)
      removed += std::filesystem::remove(e.path(), ec) ? 1 : 0;
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
