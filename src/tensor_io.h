// Between safetensors files and LibTorch: tensor views and strict state-dict loading.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "fairdiff/safetensors.h"

namespace torch::nn {
class Module;
}

namespace fairdiff {

at::ScalarType scalar_type(DType dtype);

// "[2,4,8,8]": a shape in error messages.
std::string shape_str(at::IntArrayRef shape);
// "a, b, c, ... (12 in all)": the first few names of a list in error messages.
std::string first_names(const std::vector<std::string>& names, size_t limit = 5);

// A tensor that aliases the file mapping (no copy): valid only while `file` lives.
at::Tensor tensor_view(const TensorView& view);

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

}  // namespace fairdiff
