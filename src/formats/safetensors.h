// safetensors: read (memory-mapped, validated) and write.
//
// Format: 8-byte little-endian header length N, N bytes of JSON
// {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//  "__metadata__": {"k": "v"}}, then the raw little-endian data section.
// The reader trusts nothing: the header length, JSON, dtypes, shapes and
// offsets are all checked before a single tensor is handed out.
//
//   fairdiff::SafeTensors st("unet/diffusion_pytorch_model.safetensors");
//   for (const auto& t : st.tensors()) use(t.name, t.dtype, t.shape, t.data);
//
// Torch-free; src/tensor_io.h turns a TensorView into an at::Tensor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace fairdiff {

enum class DType { F32, F16, BF16, I64, U8 };

const char* dtype_name(DType dtype);  // "F32", ...
size_t dtype_size(DType dtype);

struct TensorView {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const uint8_t* data;  // points into the mapping; valid while the SafeTensors lives
  size_t nbytes;
  int64_t numel() const;
};

class SafeTensors {
 public:
  // Maps and validates `path`; throws fairdiff::Error naming the file and the problem.
  explicit SafeTensors(const std::string& path);
  ~SafeTensors();
  SafeTensors(const SafeTensors&) = delete;
  SafeTensors& operator=(const SafeTensors&) = delete;
  SafeTensors(SafeTensors&& other) noexcept;
  SafeTensors& operator=(SafeTensors&& other) noexcept;

  const std::string& path() const { return path_; }
  const std::vector<TensorView>& tensors() const { return tensors_; }  // in data order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const TensorView* find(const std::string& name) const;  // nullptr when absent
  const TensorView& at(const std::string& name) const;    // throws when absent

  // The mapping is private and copy-on-write: tensors that alias it may be read freely,
  // and a write to one copies that page only, never the file.
  //
  // Maps the pages of `view` into this process now, in one system call, instead of one
  // page fault per 4 KiB on first use (the weights that a model aliases are all read in
  // its first step). Best effort: a kernel without MADV_POPULATE_READ faults them later.
  void prefault(const TensorView& view) const;
  // Drops this process's pages of `view` (whole pages inside it): after its bytes were
  // copied elsewhere (a load with a dtype conversion then never holds the file and the
  // converted copy at once), or while a model component is not in use. The pages stay in
  // the page cache (clean, reclaimable) and read back on the next touch or prefault.
  void discard(const TensorView& view) const;

 private:
  void release();
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::vector<TensorView> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// One tensor to write: raw little-endian bytes of size numel * dtype_size.
struct TensorData {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

// Writes a safetensors file atomically (temporary name, then rename), tensors in
// name order, header padded to 8 bytes as the reference writer does.
void write_safetensors(const std::string& path, const std::vector<TensorData>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// One tensor to write from memory that the caller keeps alive meanwhile.
struct TensorBytes {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const uint8_t* data;
  size_t nbytes;  // numel * dtype_size
};

// The same, streamed from the callers' memory to temporary_path(path, owner) (gigabytes of
// weights are never copied into one buffer first).
void write_safetensors(const std::string& path, const std::vector<TensorBytes>& tensors,
                       const std::map<std::string, std::string>& metadata, const std::string& owner);

}  // namespace fairdiff
