// Small file-system helpers shared inside the library (not public API).
#pragma once

#include <cstddef>
#include <string>

namespace fairdiff {

// Writes `contents` to temporary_path(path, owner), flushes it, then renames it
// over `path`: a crash leaves either the old file or the new one, never half.
void write_file_atomic(const std::string& path, const std::string& contents, const std::string& owner = {});

// The same for a file written in pieces (one too large to hold as one string): the pieces
// go to temporary_path(path, owner), and commit() flushes it and renames it over `path`.
// Destroyed without a commit (an error on the way), the temporary is removed.
class AtomicFileWriter {
 public:
  AtomicFileWriter(const std::string& path, const std::string& owner = {});
  ~AtomicFileWriter();
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;
  void write(const void* data, size_t bytes);
  void commit();

 private:
  std::string path_, tmp_;
  int fd_ = -1;
};

// The temporary beside `path` that write_file_atomic writes for this process:
// PATH.tmp.<owner>.<pid> (PATH.tmp.<pid> without an owner). The owner says who may
// clean it up after a crash: a generate run passes its shard ("0-of-1", "2-of-8").
std::string temporary_path(const std::string& path, const std::string& owner);

// Reads a whole text file; throws a BadInput error naming the file when absent.
std::string read_text_file(const std::string& path, const std::string& hint = {});

// Appends one line (a newline is added) with a single write, then fsyncs. A short
// write (disk full, file-size limit) is cut off again before the error is thrown; only
// a kill or power loss inside the write can leave a torn last line, which resume
// repairs (repair_manifest, src/plan) and readers skip.
void append_line_durable(const std::string& path, const std::string& line);

// Removes the temporaries of `owner` in `dir` (PATH.tmp.<owner>.<pid>) whose process is
// gone: kill(pid, 0) says ESRCH, or the pid is ours (nothing of ours is in flight when this
// is called at start-up). Other owners' temporaries and live processes' are kept: shards
// share a folder, and a pid is only known dead on this host. Returns how many it removed.
int remove_stale_temporaries(const std::string& dir, const std::string& owner);

bool is_directory(const std::string& path);
bool is_regular_file(const std::string& path);

}  // namespace fairdiff
