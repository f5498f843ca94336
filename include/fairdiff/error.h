// fairdiff::Error: the one exception type of the library.
//
// Every failure a user can cause (a missing file, a malformed header, an
// unsupported config value) is thrown as an Error that says where it happened,
// what is wrong, and how to fix it. `main` prints `what()` as one line and maps
// `kind()` to an exit code. Torch-free on purpose: the CLI includes it.
#pragma once

#include <stdexcept>
#include <string>

namespace fairdiff {

enum class ErrorKind {
  BadInput,     // the user's file, folder, flag or value is wrong: exit 2
  Unsupported,  // valid for the reference, not (yet) for us: exit 2
  Runtime,      // something failed while working (I/O, out of memory): exit 1
};

class Error : public std::runtime_error {
 public:
  // where: the file, folder or flag concerned; problem: what was expected and
  // what was found; hint: what the user can do (may be empty).
  Error(ErrorKind kind, std::string where, std::string problem, std::string hint = {});

  ErrorKind kind() const { return kind_; }
  const std::string& where() const { return where_; }
  const std::string& problem() const { return problem_; }
  const std::string& hint() const { return hint_; }

 private:
  ErrorKind kind_;
  std::string where_, problem_, hint_;
};

// Shorthands for the common cases.
[[noreturn]] void throw_bad_input(const std::string& where, const std::string& problem,
                                  const std::string& hint = {});
[[noreturn]] void throw_unsupported(const std::string& where, const std::string& problem,
                                    const std::string& hint = {});

// Exit code for an error kind, as documented in the README.
int exit_code(ErrorKind kind);

}  // namespace fairdiff
