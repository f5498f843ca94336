#include "tensor_io.h"

#include <torch/nn/module.h>

#include <sys/mman.h>

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

// The converted CPU copies of one file's tensors (a bf16 model from a float32 file), in one
// anonymous mapping that asks for transparent huge pages: the copies are fresh memory, and a
// 2 MB fault costs far less than 512 faults of 4 KB where faults are slow. On a 2-vCPU VM
// measured here, 2 GB of new 4 KB pages took 7.5-8.4 s and of huge pages 2.7-4.2 s, and the
// bf16 load of SD 1.5 (2.1 GB of copies) went from 7.6-10.7 s to 5.2-5.7 s, with the same
// bytes out. Unmapped when its last tensor is freed.
class CopyArena {
 public:
  static constexpr size_t kHuge = size_t{2} << 20;
  explicit CopyArena(size_t bytes) : size_(bytes + kHuge) {
    void* p = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
      throw Error(ErrorKind::Runtime, "loading the weights",
                  "no memory for the " + std::to_string(bytes >> 20) + " MiB of converted weights",
                  "free memory, or load in the dtype the files are stored in (--dtype)");
    base_ = static_cast<uint8_t*>(p);
    // From the first 2 MB boundary, so that every whole 2 MB of the copies can be a huge page.
    start_ = base_ + (kHuge - reinterpret_cast<uintptr_t>(base_) % kHuge) % kHuge;
    madvise(start_, bytes, MADV_HUGEPAGE);  // advice: without THP the pages are small, as before
  }
  ~CopyArena() { munmap(base_, size_); }
  CopyArena(const CopyArena&) = delete;
  CopyArena& operator=(const CopyArena&) = delete;
  uint8_t* at(size_t offset) const { return start_ + offset; }
  // A copy freed before the others (a weight replaced after the load, as --prepack-weights
  // does) gives its whole pages back, as a freed tensor would.
  static void release(void* data, size_t bytes) {
    constexpr uintptr_t kPage = 4096;
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kPage - 1) / kPage * kPage;
    const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) / kPage * kPage;
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
  }

 private:
  size_t size_;
  uint8_t* base_;
  uint8_t* start_;
};

// Bytes of a tensor of `view`'s shape in `dtype`, rounded up to 64 (the CPU allocator's alignment).
size_t copy_bytes(const TensorView& view, at::ScalarType dtype) {
  return (static_cast<size_t>(view.numel()) * c10::elementSize(dtype) + 63) / 64 * 64;
}

// Fills the module's tensors from the file: an alias of the mapping where `owner` is given
// and the tensor can be one, else one copy to (dtype, device) of the module's tensor (the
// CPU copies in one CopyArena).
std::vector<const TensorView*> fill_state_dict(std::vector<std::pair<std::string, at::Tensor>>& targets,
                                               const SafeTensors& file, const std::shared_ptr<const SafeTensors>& owner,
                                               c10::optional<at::ScalarType> dtype, c10::optional<at::Device> device) {
  at::NoGradGuard no_grad;
  struct Fill {
    at::Tensor* target;
    const TensorView* view;
    at::ScalarType dtype;
    at::Device device;
    bool alias;
  };
  std::vector<Fill> fills;
  size_t arena_bytes = 0;
  for (auto& [name, target] : targets) {
    const TensorView& view = *file.find(name);
    // Integer buffers keep their dtype; floating tensors take the requested one.
    const at::ScalarType to_dtype = dtype && at::isFloatingType(target.scalar_type()) ? *dtype : target.scalar_type();
    const at::Device to_device = device.value_or(target.device());
    const bool alias = owner && can_alias(tensor_view(view), to_dtype, to_device);
    if (!alias && to_device.is_cpu()) arena_bytes += copy_bytes(view, to_dtype);
    fills.push_back({&target, &view, to_dtype, to_device, alias});
  }
  const auto arena = arena_bytes > 0 ? std::make_shared<CopyArena>(arena_bytes) : nullptr;
  size_t offset = 0;
  std::vector<const TensorView*> aliased;
  for (const Fill& f : fills) {
    if (f.alias) {
      f.target->set_data(tensor_view(*f.view, owner));
      aliased.push_back(f.view);
      continue;
    }
    if (f.device.is_cpu()) {
      const size_t bytes = copy_bytes(*f.view, f.dtype);
      at::Tensor copy = at::from_blob(
          arena->at(offset), f.view->shape, [arena, bytes](void* data) { CopyArena::release(data, bytes); },
          at::TensorOptions().dtype(f.dtype));
      offset += bytes;
      copy.copy_(tensor_view(*f.view));
      f.target->set_data(copy);
    } else {
      f.target->set_data(tensor_view(*f.view).to(f.device, f.dtype, /*non_blocking=*/false, /*copy=*/true));
    }
    if (owner) file.discard(*f.view);
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
