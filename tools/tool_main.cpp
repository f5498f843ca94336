#include "tool_main.h"

#include <c10/util/Exception.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>
#include <string>

#include "fairdiff/error.h"

namespace fairdiff::tools {

int run_tool(const char* name, CLI::App& app, int argc, char** argv, const std::function<int()>& body) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    std::fprintf(stderr, "%s: error: %s (run %s --help)\n", name, e.what(), name);
    return 2;
  }
  try {
    return body();
  } catch (const fairdiff::Error& e) {
    std::fprintf(stderr, "%s: error: %s\n", name, e.what());
    return fairdiff::exit_code(e.kind());
  } catch (const c10::Error& e) {
    // LibTorch's message continues with where it was raised; the first line says what.
    const std::string what = e.what_without_backtrace();
    std::fprintf(stderr, "%s: error: %s\n", name, what.substr(0, what.find('\n')).c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", name, e.what());
    return 1;
  }
}

}  // namespace fairdiff::tools
