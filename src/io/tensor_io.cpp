#include "tensor_io.h"

#include <torch/nn/module.h>

#include <algorithm>
#include <set>

#include "fairdiff/error.h"
#include "string_util.h"

namespace fairdiff {
at::ScalarType scalar_type(DType dtype) {
  switch (dtype) {
    case DType::F32: return at::kFloat;
    case DType::F16: return at::kHalf;
    case DType::BF16: return at::kBFloat16;
    case DType::I64: return at::kLong;
    case DType::U8: return at::kByte;
  }
  return at::kFloat;
}

at::Tensor tensor_view(const TensorView& view) {
  // from_blob never frees; the data section is read-only, and callers only read it.
  return at::from_blob(const_cast<uint8_t*>(view.data), view.shape,
                       at::TensorOptions().dtype(scalar_type(view.dtype)));
}

at::Tensor tensor_view(const TensorView& view, std::shared_ptr<const SafeTensors> owner) {
  // The deleter holds the owner: the mapping outlives every tensor that points into it.
  return at::from_blob(
      const_cast<uint8_t*>(view.data), view.shape, [owner = std::move(owner)](void*) mutable { owner.reset(); },
      at::TensorOptions().dtype(scalar_type(view.dtype)));
}

bool can_alias(const at::Tensor& stored, at::ScalarType dtype, const at::Device& device) {
  const auto address = reinterpret_cast<uintptr_t>(stored.data_ptr());
  return device.is_cpu() && stored.scalar_type() == dtype && stored.is_contiguous() &&
         address % static_cast<uintptr_t>(stored.element_size()) == 0;
}

at::Tensor load_tensor(const TensorView& view, at::ScalarType dtype) {
  return tensor_view(view).to(dtype, /*non_blocking=*/false, /*copy=*/true);
}

namespace {

// Checks that `module` and `file` name the same tensors with the same shapes; throws
// listing the first few differences. Returns the module's tensors by name.
// transformers' CLIP embeddings kept `position_ids` (0..L-1) as a checkpoint tensor until
// 4.31; the real SD 1.x text encoders and OpenAI's CLIP files still carry it. Newer
// transformers rebuild it and skip the stored copy, as we do: it never differs.
bool is_legacy_position_ids(const std::string& name) {
  const std::string suffix = "embeddings.position_ids";
  return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::vector<std::pair<std::string, at::Tensor>> match_state_dict(torch::nn::Module& module, const SafeTensors& file,
                                                                 const std::string& component) {
  std::vector<std::pair<std::string, at::Tensor>> targets;
  for (const auto& p : module.named_parameters(/*recurse=*/true)) targets.emplace_back(p.key(), p.value());
  for (const auto& b : module.named_buffers(/*recurse=*/true)) targets.emplace_back(b.key(), b.value());

  std::vector<std::string> missing, mismatched;
  std::set<std::string> expected;
  for (const auto& [name, target] : targets) {
    expected.insert(name);
    const TensorView* view = file.find(name);
    if (!view) {
      missing.push_back(name);
    } else if (at::IntArrayRef(view->shape) != target.sizes()) {
      mismatched.push_back(name + " (file " + shape_str(view->shape) + ", model " + shape_str(target.sizes().vec()) +
                           ")");
    }
  }
  std::vector<std::string> unexpected;
  for (const auto& t : file.tensors())
    if (!expected.count(t.name) && !is_legacy_position_ids(t.name)) unexpected.push_back(t.name);

  const std::string hint = "the " + component + " config.json does not describe these weights";
  if (!mismatched.empty())
    throw_bad_input(file.path(), std::to_string(mismatched.size()) + " " + component +
                                     " tensors have the wrong shape: " + first_names(mismatched), hint);
  if (!missing.empty())
    throw_bad_input(file.path(), std::to_string(missing.size()) + " " + component +
                                     " tensors are missing: " + first_names(missing), hint);
  if (!unexpected.empty())
    throw_bad_input(file.path(), std::to_string(unexpected.size()) + " tensors are not part of the " + component +
                                     ": " + first_names(unexpected), hint);

  return targets;
}

// Fills the module's tensors from the file: an alias of the mapping where `owner` is given
// and the tensor can be one, else one copy to (dtype, device) of the module's tensor.
std::vector<const TensorView*> fill_state_dict(std::vector<std::pair<std::string, at::Tensor>>& targets,
                                               const SafeTensors& file, const std::shared_ptr<const SafeTensors>& owner,
                                               c10::optional<at::ScalarType> dtype, c10::optional<at::Device> device) {
  at::NoGradGuard no_grad;
  std::vector<const TensorView*> aliased;
  for (auto& [name, target] : targets) {
    const TensorView& view = *file.find(name);
    // Integer buffers keep their dtype; floating tensors take the requested one.
    const at::ScalarType to_dtype = dtype && at::isFloatingType(target.scalar_type()) ? *dtype : target.scalar_type();
    const at::Device to_device = device.value_or(target.device());
    if (owner) {
      at::Tensor src = tensor_view(view, owner);
      if (can_alias(src, to_dtype, to_device)) {
        target.set_data(src);
        aliased.push_back(&view);
        continue;
      }
    }
    target.set_data(tensor_view(view).to(to_device, to_dtype, /*non_blocking=*/false, /*copy=*/true));
    if (owner) file.discard(view);
  }
  return aliased;
}

}  // namespace

void load_state_dict(torch::nn::Module& module, const SafeTensors& file, const std::string& component,
                     c10::optional<at::ScalarType> dtype, c10::optional<at::Device> device) {
  auto targets = match_state_dict(module, file, component);
  fill_state_dict(targets, file, nullptr, dtype, device);
}

std::vector<const TensorView*> load_state_dict(torch::nn::Module& module,
                                               const std::shared_ptr<const SafeTensors>& file,
                                               const std::string& component, c10::optional<at::ScalarType> dtype,
                                               c10::optional<at::Device> device) {
  auto targets = match_state_dict(module, *file, component);
  return fill_state_dict(targets, *file, file, dtype, device);
}

MappedWeights::MappedWeights(std::shared_ptr<const SafeTensors> file, std::vector<const TensorView*> views)
    : file_(std::move(file)), views_(std::move(views)) {}

void MappedWeights::page_out() {
  for (const TensorView* v : views_) file_->discard(*v);
  resident_ = false;
}

void MappedWeights::page_in() {
  if (resident_) return;
  prefault_all();
}

void MappedWeights::prefault_all() {
  for (const TensorView* v : views_) file_->prefault(*v);
  resident_ = true;
}

bool MappedWeights::forget(const void* data) {
  auto it = std::find_if(views_.begin(), views_.end(), [&](const TensorView* v) { return v->data == data; });
  if (it == views_.end()) return false;
  file_->discard(**it);
  views_.erase(it);
  return true;
}

size_t MappedWeights::bytes() const {
  size_t n = 0;
  for (const TensorView* v : views_) n += v->nbytes;
  return n;
}

void save_state_dict(torch::nn::Module& module, const std::string& path) {
  std::vector<TensorData> tensors;
  auto add = [&](const std::string& name, const at::Tensor& value) {
    const at::Tensor t = value.detach().to(at::kFloat).contiguous();
    TensorData d{name, DType::F32, t.sizes().vec(), {}};
    const auto* begin = static_cast<const uint8_t*>(t.data_ptr());
    d.bytes.assign(begin, begin + t.numel() * static_cast<int64_t>(sizeof(float)));
    tensors.push_back(std::move(d));
  };
  for (const auto& p : module.named_parameters()) add(p.key(), p.value());
  for (const auto& b : module.named_buffers()) add(b.key(), b.value());
  write_safetensors(path, tensors, {{"format", "pt"}});
}

}  // namespace fairdiff
