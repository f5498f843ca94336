// Between safetensors files and LibTorch: tensor views and strict state-dict loading.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

#include "safetensors.h"

namespace torch::nn {
class Module;
}

namespace fairdiff {

at::ScalarType scalar_type(DType dtype);

// A tensor that aliases the file mapping (no copy): valid only while `file` lives.
at::Tensor tensor_view(const TensorView& view);
// The same, keeping `owner` (the SafeTensors holding the mapping) alive for as long as
// the tensor's storage, or any view of it, lives.
at::Tensor tensor_view(const TensorView& view, std::shared_ptr<const SafeTensors> owner);

// Whether a module tensor of (dtype, device) can be the stored tensor itself instead of a
// copy: same dtype, on the CPU, contiguous and aligned to its element size.
bool can_alias(const at::Tensor& stored, at::ScalarType dtype, const at::Device& device);

// A tensor that owns its data, converted to `dtype` in the same single copy.
at::Tensor load_tensor(const TensorView& view, at::ScalarType dtype);

// Loads every parameter and buffer of `module` from `file` by name, converting
// in one copy per tensor to `dtype`/`device` when given, else to the dtype and
// device that the module's tensor already has. Strict: a missing or
// unexpected key, or a shape mismatch, throws an Error listing the first few.
// `component` names the part in messages ("unet", "vae", ...).
void load_state_dict(torch::nn::Module& module, const SafeTensors& file, const std::string& component,
                     c10::optional<at::ScalarType> dtype = c10::nullopt,
                     c10::optional<at::Device> device = c10::nullopt);

// The same, without a copy where it can: a CPU tensor whose dtype equals the file's
// becomes a read-only view of the mapping and keeps `file` alive (the caller prefaults the
// returned views, MappedWeights::prefault_all, once it knows which it keeps); so a
// float32 model in a float32 file is in memory once, not twice. (Such weights must not be
// changed in place: clone one first.) Tensors that are converted or moved are copied, and
// their pages of the file dropped right after. Returns the views that were aliased.
std::vector<const TensorView*> load_state_dict(torch::nn::Module& module,
                                               const std::shared_ptr<const SafeTensors>& file,
                                               const std::string& component,
                                               c10::optional<at::ScalarType> dtype = c10::nullopt,
                                               c10::optional<at::Device> device = c10::nullopt);

// The weights of one model component that alias a file mapping, and whether their pages
// were mapped in (prefault_all, page_in) since they were last given back. A component not in
// use can give its pages back (page_out: the page cache keeps them, clean and reclaimable)
// and map them again in one call before use (page_in); the tensors never change, only the
// resident memory does. Nothing is mapped in when constructed: pages a network touches
// without page_in are faulted one by one.
class MappedWeights {
 public:
  MappedWeights() = default;
  MappedWeights(std::shared_ptr<const SafeTensors> file, std::vector<const TensorView*> views);
  void page_out();  // every page, whether mapped in by page_in or touched since
  void page_in();
  void prefault_all();  // maps every view's pages now (page_in regardless of the state)
  // The tensor stored at `data` is no longer used (its layer keeps another copy): its
  // pages are dropped and never mapped in again. False when no view starts there.
  bool forget(const void* data);
  bool resident() const { return resident_; }
  size_t bytes() const;  // of the aliased tensors
  bool empty() const { return views_.empty(); }
  const SafeTensors* file() const { return file_.get(); }

 private:
  std::shared_ptr<const SafeTensors> file_;
  std::vector<const TensorView*> views_;
  bool resident_ = false;
};

// Writes every parameter and buffer of `module` as a float32 safetensors file named by
// the checkpoint keys (atomically: temporary name, then rename).
void save_state_dict(torch::nn::Module& module, const std::string& path);

}  // namespace fairdiff
