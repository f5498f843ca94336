// The main() of a development tool: parse the flags, run, turn every error into one line.
//
//   int main(int argc, char** argv) {
//     CLI::App app{"fairdiff-x: what it does"};
//     Options o;
//     app.add_option("--steps", o.steps, "denoising steps");
//     return fairdiff::tools::run_tool("fairdiff-x", app, argc, argv, [&] { return run(o); });
//   }
//
// Exit codes as the CLI's (README "Errors and exit codes"): --help 0, a bad flag 2, a
// fairdiff::Error its kind's code, any other exception 1. Torch-free and CLI11-free.
#pragma once

#include <functional>

namespace CLI {
class App;
}

namespace fairdiff::tools {

// Parses argc/argv into app, then returns body(). A usage error prints
// "NAME: error: ... (run NAME --help)"; an exception from body prints "NAME: error: ..."
// (a LibTorch error only its first line, never a backtrace).
int run_tool(const char* name, CLI::App& app, int argc, char** argv, const std::function<int()>& body);

}  // namespace fairdiff::tools
