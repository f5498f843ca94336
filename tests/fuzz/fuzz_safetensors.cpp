// A .safetensors file: the input is the whole file (8-byte header length, JSON header,
// data). SafeTensors must accept it with every view inside the mapping, or refuse it.
// Accepted files also go through the single-file checkpoint planner (names and shapes).
#include <cstring>

#include "fuzz_util.h"
#include "safetensors.h"
#include "single_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::scratch_dir() + "/model.safetensors";
  fuzz::write_file(path, std::string(reinterpret_cast<const char*>(data), size));
  fuzz::refuse_cleanly([&] {
    const fairdiff::SafeTensors st(path);
    fairdiff::TensorShapes shapes;
    uint64_t sum = 0;
    for (const fairdiff::TensorView& t : st.tensors()) {
      if (static_cast<uint64_t>(t.numel()) * fairdiff::dtype_size(t.dtype) != t.nbytes) std::abort();
      // Touch the first and last byte: ASan has no view of the mapping, a fault does.
      if (t.nbytes) sum += t.data[0] + t.data[t.nbytes - 1];
      if (st.find(t.name) != &st.at(t.name)) std::abort();
      shapes.emplace_back(t.name, t.shape);
    }
    for (const auto& [key, value] : st.metadata()) sum += key.size() + value.size();
    (void)sum;
    fairdiff::plan_single_file(shapes, path);
  });
  return 0;
}
