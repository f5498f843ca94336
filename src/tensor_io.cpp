#include "tensor_io.h"

#include <torch/nn/module.h>

#include <set>

#include "fairdiff/error.h"

namespace fairdiff {
std::string shape_str(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string first_names(const std::vector<std::string>& names, size_t limit) {
  std::string s;
  for (size_t i = 0; i < names.size() && i < limit; ++i) s += (i ? ", " : "") + names[i];
  if (names.size() > limit) s += ", ... (" + std::to_string(names.size()) + " in all)";
  return s;
}

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

at::Tensor load_tensor(const TensorView& view, at::ScalarType dtype) {
  return tensor_view(view).to(dtype, /*non_blocking=*/false, /*copy=*/true);
}

void load_state_dict(torch::nn::Module& module, const SafeTensors& file, const std::string& component,
                     c10::optional<at::ScalarType> dtype, c10::optional<at::Device> device) {
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
      mismatched.push_back(name + " (file " + shape_str(view->shape) + ", model " + shape_str(target.sizes()) + ")");
    }
  }
  std::vector<std::string> unexpected;
  for (const auto& t : file.tensors())
    if (!expected.count(t.name)) unexpected.push_back(t.name);

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

  at::NoGradGuard no_grad;
  for (auto& [name, target] : targets) {
    // One copy: file bytes -> (dtype, device) of the module's tensor.
    at::Tensor src = tensor_view(*file.find(name));
    // Integer buffers keep their dtype; floating tensors take the requested one.
    const at::ScalarType to_dtype = dtype && at::isFloatingType(target.scalar_type()) ? *dtype : target.scalar_type();
    target.set_data(src.to(device.value_or(target.device()), to_dtype, /*non_blocking=*/false, /*copy=*/true));
  }
}

}  // namespace fairdiff
