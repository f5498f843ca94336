#include "fairdiff/error.h"

namespace fairdiff {
namespace {

std::string one_line(std::string s) {
  // One error, one line: a newline in a file name or value must not split it.
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  return s;
}

std::string compose(const std::string& where, const std::string& problem, const std::string& hint) {
  std::string msg = where.empty() ? problem : where + ": " + problem;
  if (!hint.empty()) msg += " (" + hint + ")";
  return one_line(msg);
}

}  // namespace

Error::Error(ErrorKind kind, std::string where, std::string problem, std::string hint)
    : std::runtime_error(compose(where, problem, hint)),
      kind_(kind),
      where_(std::move(where)),
      problem_(std::move(problem)),
      hint_(std::move(hint)) {}

void throw_bad_input(const std::string& where, const std::string& problem, const std::string& hint) {
  throw Error(ErrorKind::BadInput, where, problem, hint);
}

void throw_unsupported(const std::string& where, const std::string& problem, const std::string& hint) {
  throw Error(ErrorKind::Unsupported, where, problem, hint);
}

int exit_code(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::BadInput:
    case ErrorKind::Unsupported:
      return 2;
    case ErrorKind::Runtime:
      return 1;
  }
  return 1;
}

}  // namespace fairdiff
