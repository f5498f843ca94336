// Nothing lost, nothing mixed (issue 14): the per-manifest lock, temporaries that name their
// shard and process, and resume's repair of a torn manifest line. Torch-free.
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "fairdiff/audit.h"
#include "file_lock.h"
#include "fs_util.h"
#include "run_plan.h"
#include "test_util.h"

namespace fairdiff {
namespace {

using test::expect_error;
using test::TempDir;

std::string slurp(const std::string& path) { return read_text_file(path); }

void spit(const std::string& path, const std::string& text) { std::ofstream(path, std::ios::binary) << text; }

std::string host_name() {
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  return host;
}

// A pid that has just exited (reaped): kill(pid, 0) gives ESRCH.
pid_t dead_pid() {
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ::waitpid(child, nullptr, 0);
  return child;
}

// ----- the lock -----------------------------------------------------------------------

TEST(Lock, SecondTakerOfTheSameManifestFailsNamingTheHolder) {
  TempDir dir;
  const std::string manifest = dir / "manifest.jsonl";
  const FileLock first(manifest_lock_path(manifest), manifest, "wait for it");
  EXPECT_EQ(FileLock::holder(manifest_lock_path(manifest)),
            "pid " + std::to_string(::getpid()) + " on host " + host_name());
  expect_error([&] { FileLock second(manifest_lock_path(manifest), manifest, "wait for it"); }, ErrorKind::BadInput,
               {"manifest.jsonl: in use by pid " + std::to_string(::getpid()) + " on host " + host_name(),
                "manifest.jsonl.lock", "wait for it"});
}

TEST(Lock, OtherShardsLockTheirOwnManifest) {
  TempDir dir;
  const std::string a = dir / "manifest-shard-0-of-2.jsonl", b = dir / "manifest-shard-1-of-2.jsonl";
  const FileLock first(manifest_lock_path(a), a, "");
  EXPECT_NO_THROW(FileLock second(manifest_lock_path(b), b, ""));
}

TEST(Lock, ReleasedWhenDroppedAndWhenTheHolderIsKilled) {
  TempDir dir;
  const std::string manifest = dir / "manifest.jsonl", lock = manifest_lock_path(manifest);
  { const FileLock once(lock, manifest, ""); }
  EXPECT_NO_THROW(FileLock again(lock, manifest, ""));

  // A child takes the lock and is SIGKILLed while holding it: no stale lock is left.
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t child = ::fork();
  if (child == 0) {
    const FileLock held(lock, manifest, "");
    const char c = 'x';
    if (::write(ready[1], &c, 1) != 1) ::_exit(1);
    ::pause();
    ::_exit(0);
  }
  char c;
  ASSERT_EQ(::read(ready[0], &c, 1), 1);
  expect_error([&] { FileLock mine(lock, manifest, ""); }, ErrorKind::BadInput,
               {"in use by pid " + std::to_string(child) + " on host"});
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  ::close(ready[0]);
  ::close(ready[1]);
  EXPECT_NO_THROW(FileLock mine(lock, manifest, ""));
}

// ----- temporaries --------------------------------------------------------------------

TEST(Temporaries, NameTheirShardAndProcess) {
  EXPECT_EQ(temporary_path("out/00001-7.png", "0-of-2"), "out/00001-7.png.tmp.0-of-2." + std::to_string(::getpid()));
  EXPECT_EQ(temporary_path("out/manifest.jsonl", ""), "out/manifest.jsonl.tmp." + std::to_string(::getpid()));
}

TEST(Temporaries, OnlyThisShardsDeadOnesAreRemoved) {
  TempDir dir;
  const std::string dead = std::to_string(dead_pid()), ours = std::to_string(::getpid()),
                    live = std::to_string(::getppid());
  const std::vector<std::string> removed = {"00000-1.png.tmp.0-of-2." + dead, "00002-3.png.tmp.0-of-2." + ours};
  const std::vector<std::string> kept = {
      "00004-5.png.tmp.0-of-2." + live,  // another live process of this shard (it would hold the lock)
      "00001-2.png.tmp.1-of-2." + dead,  // another shard's: its own run cleans it
      "00003-4.png.tmp.0-of-1." + dead,  // the unsharded run's
      "00005-6.png",                     // an image
      "00006-7.png.tmp.0-of-2.x1",       // not a pid
      "manifest-shard-0-of-2.jsonl.lock"};
  for (const auto& name : removed) spit(dir / name, "x");
  for (const auto& name : kept) spit(dir / name, "x");
  EXPECT_EQ(remove_stale_temporaries(dir.path.string(), "0-of-2"), 2);
  for (const auto& name : removed) EXPECT_FALSE(std::filesystem::exists(dir / name)) << name;
  for (const auto& name : kept) EXPECT_TRUE(std::filesystem::exists(dir / name)) << name;
}

TEST(Temporaries, AtomicWriteLeavesNoneBehind) {
  TempDir dir;
  write_file_atomic(dir / "a.png", "bytes", "0-of-1");
  EXPECT_EQ(slurp(dir / "a.png"), "bytes");
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir.path), {}), 1);
}

// ----- torn manifests -----------------------------------------------------------------

const std::string kLine1 = R"({"index":0,"file":"00000-1.png","prompt":"a kite"})";
const std::string kLine2 = R"({"index":1,"file":"00001-2.png","prompt":"a kite"})";
const std::string kLine3 = R"({"index":2,"file":"00002-3.png","prompt":"a kite"})";

TEST(Manifest, TornLastLineIsMovedAsideAtAnyByte) {
  const std::string whole = kLine1 + "\n" + kLine2 + "\n" + kLine3 + "\n";
  const size_t third = whole.size() - kLine3.size() - 1;
  for (size_t cut = third + 1; cut < whole.size() - 1; ++cut) {  // the third line cut inside
    SCOPED_TRACE("cut at byte " + std::to_string(cut));
    TempDir dir;
    const std::string manifest = dir / "manifest.jsonl";
    spit(manifest, whole.substr(0, cut));
    EXPECT_EQ(repair_manifest(manifest, "0-of-1"), 1);
    EXPECT_EQ(slurp(manifest), kLine1 + "\n" + kLine2 + "\n");
    EXPECT_EQ(slurp(manifest + ".torn"), whole.substr(third, cut - third) + "\n");
    EXPECT_EQ(read_manifest(manifest).size(), 2u);
    EXPECT_EQ(repair_manifest(manifest, "0-of-1"), 0);  // repaired: nothing more to do
    append_line_durable(manifest, kLine3);            // the image redone
    EXPECT_EQ(slurp(manifest), whole);
  }
}

TEST(Manifest, WholeLinesAreLeftAlone) {
  const std::string whole = kLine1 + "\n" + kLine2 + "\n";
  for (const std::string& text : {std::string(), kLine1 + "\n", whole}) {
    TempDir dir;
    spit(dir / "manifest.jsonl", text);
    EXPECT_EQ(repair_manifest(dir / "manifest.jsonl", "0-of-1"), 0);
    EXPECT_EQ(slurp(dir / "manifest.jsonl"), text);
    EXPECT_FALSE(std::filesystem::exists(dir / "manifest.jsonl.torn"));
  }
  TempDir none;
  EXPECT_EQ(repair_manifest(none / "manifest.jsonl", "0-of-1"), 0);
  EXPECT_FALSE(std::filesystem::exists(none / "manifest.jsonl"));

  // Cut just before the newline: the record is whole and only gets its newline.
  TempDir dir;
  spit(dir / "manifest.jsonl", kLine1 + "\n" + kLine2);
  EXPECT_EQ(repair_manifest(dir / "manifest.jsonl", "0-of-1"), 0);
  EXPECT_EQ(slurp(dir / "manifest.jsonl"), whole);
}

// Resuming and merging read a record's index and file name as such: a line with a file that
// is not a string (found by the manifest fuzz target: check_resume threw json's type_error)
// or without one is not a record of ours, and is skipped as a torn line is.
TEST(Manifest, LinesWithoutAStringFileAreNotRecords) {
  TempDir dir;
  spit(dir / "manifest.jsonl", kLine1 + "\n" + R"({"index":1,"file":42,"prompt":"a kite"})" + "\n" +
                                   R"({"index":2,"prompt":"a kite"})" + "\n");
  const auto records = read_manifest(dir / "manifest.jsonl");
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records.at(0).at("file"), "00000-1.png");
}

TEST(Manifest, TornLineGluedToTheNextIsMovedAside) {
  // An older fairdiff appended after a torn line: the torn part and the next record share a line.
  TempDir dir;
  const std::string glued = kLine2.substr(0, 10) + kLine3;
  spit(dir / "manifest.jsonl", kLine1 + "\n" + glued + "\n" + kLine2 + "\n");
  EXPECT_EQ(repair_manifest(dir / "manifest.jsonl", "0-of-1"), 1);
  EXPECT_EQ(slurp(dir / "manifest.jsonl"), kLine1 + "\n" + kLine2 + "\n");
  EXPECT_EQ(slurp(dir / "manifest.jsonl.torn"), glued + "\n");
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir.path), {}), 2);  // no temporary left
}

TEST(Manifest, ShortAppendIsCutOffAgain) {
  // A file-size limit makes the append a short write, as a full disk does.
  TempDir dir;
  const std::string manifest = dir / "manifest.jsonl";
  spit(manifest, kLine1 + "\n");
  const pid_t child = ::fork();
  if (child == 0) {
    ::signal(SIGXFSZ, SIG_IGN);
    const rlimit limit{kLine1.size() + 20, kLine1.size() + 20};  // the line (+ newline) has 19 bytes of room
    ::setrlimit(RLIMIT_FSIZE, &limit);
    try {
      append_line_durable(manifest, kLine2);
    } catch (const Error& e) {
      const std::string what = e.what();
      ::_exit(e.kind() == ErrorKind::Runtime && what.find("append failed: wrote 19 of") != std::string::npos ? 0 : 2);
    }
    ::_exit(1);
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_EQ(slurp(manifest), kLine1 + "\n");
}

TEST(Manifest, AuditNamesATornLastLine) {
  TempDir dir;
  spit(dir / "manifest.jsonl", kLine1 + "\n" + kLine2.substr(0, 17));
  AuditOptions o;
  o.dir = dir.path.string();
  expect_error([&] { audit(o); }, ErrorKind::BadInput,
               {"manifest.jsonl:2", "the last line is torn", "rerun the same generate command"});
}

}  // namespace
}  // namespace fairdiff
