// Where fairdiff's data live at run time: the shipped model (models/toy) and the
// attribute library (configs/attributes). Never a path compiled in from the source tree,
// so an installed or moved binary finds them. Looked up, in order:
//   1. $FAIRDIFF_DATA_DIR (a folder laid out like share/fairdiff)
//   2. beside the running program: <bin>/share/fairdiff (the build tree links its
//      share/fairdiff to the source folders) and <bin>/../share/fairdiff (an install:
//      bin/fairdiff next to share/fairdiff)
//   3. the install prefix chosen at configure time: <prefix>/share/fairdiff
#pragma once

#include <string>
#include <vector>

namespace fairdiff {

// The folders searched, in order (those that do not exist included).
std::vector<std::string> data_dirs();

// The first existing <dir>/<relative> over data_dirs(); "" when none has it.
std::string find_data(const std::string& relative);

}  // namespace fairdiff
