// libgomp reads OMP_WAIT_POLICY once, in its initialiser, before main. Left unset, its idle
// workers spin at every barrier and take the cores from OpenBLAS's own threads: the text
// encoder of a first image took 8 s instead of 1 on the 2-core build VM (runtime.h), and with
// LibTorch 2.14 / GCC 16's libgomp the paper protocol's first run took over 420 s instead of
// 98 s. So when the user has not chosen, our processes (the CLI and every development tool)
// sleep their workers (PASSIVE).
//
// The variable cannot simply be set: nothing of ours runs between libc's initialiser (which
// sets the environment to the one on the stack, undoing a setenv in .preinit_array) and
// libgomp's. Starting the process again with the variable set costs the loader's relocations
// of LibTorch a second time (0.65 s on the build VM). Instead the executable defines getenv
// and secure_getenv, exported (CMakeLists.txt, fairdiff_omp_passive_default): the dynamic
// loader binds every library's calls to the executable's definition first, so libgomp's
// initialiser asks us, and we answer as libc would, except that an unset OMP_WAIT_POLICY reads
// PASSIVE. GCC 13's libgomp and later read the OMP_ variables from `environ` directly (Debian
// 12's GCC 12 asks getenv), so an unset GOMP_SPINCOUNT also reads 0 while OMP_WAIT_POLICY is
// unset: the spin count is all PASSIVE changes. ctest `omp_wait_policy` checks what libgomp
// took (OMP_DISPLAY_ENV=verbose: policy and spin count) with the variable unset and set, in
// the CLI and in tools.
//
// An object file, linked into each executable: a static archive's member would be pulled in
// only by chance of link order, and a shared library's definition would not come first.
#include <sys/auxv.h>

#include <cstring>

namespace {
extern "C" char** environ;
// The value of `name` in the environment, as libc's getenv finds it.
char* environment_value(const char* name) {
  const size_t len = std::strlen(name);
  for (char** e = environ; e && *e; ++e)
    if (std::strncmp(*e, name, len) == 0 && (*e)[len] == '=') return *e + len + 1;
  return nullptr;
}
}  // namespace

extern "C" {
__attribute__((visibility("default"))) char* getenv(const char* name) noexcept {
  if (char* value = environment_value(name)) return value;
  static char passive[] = "PASSIVE", no_spin[] = "0";
  if (std::strcmp(name, "OMP_WAIT_POLICY") == 0) return passive;
  // libgomp from GCC 13 on reads the OMP_ variables from `environ` itself, but still asks
  // getenv for GOMP_SPINCOUNT; a spin count of 0 is what PASSIVE sets.
  if (std::strcmp(name, "GOMP_SPINCOUNT") == 0 && !environment_value("OMP_WAIT_POLICY")) return no_spin;
  return nullptr;
}
// libc's secure_getenv: nothing in a set-user-ID or set-group-ID process.
__attribute__((visibility("default"))) char* secure_getenv(const char* name) noexcept {
  return getauxval(AT_SECURE) ? nullptr : getenv(name);
}
}
