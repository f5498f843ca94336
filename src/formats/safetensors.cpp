#include "safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>

#include "fairdiff/error.h"
#include "fs_util.h"

namespace fairdiff {
namespace {

// A header larger than this is certainly not a tensor index (the real SDXL
// UNet header is about 200 KB); refusing it early avoids a huge allocation.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

bool parse_dtype(const std::string& s, DType* out) {
  static const std::pair<const char*, DType> kNames[] = {
      {"F32", DType::F32}, {"F16", DType::F16}, {"BF16", DType::BF16},
      {"I64", DType::I64}, {"U8", DType::U8}};
  for (const auto& [name, dtype] : kNames)
    if (s == name) {
      *out = dtype;
      return true;
    }
  return false;
}

}  // namespace

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I64: return "I64";
    case DType::U8: return "U8";
  }
  return "?";
}

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::F32: return 4;
    case DType::F16: case DType::BF16: return 2;
    case DType::I64: return 8;
    case DType::U8: return 1;
  }
  return 0;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

SafeTensors::SafeTensors(const std::string& path) : path_(path) {
  const std::string hint_corrupt = "the file is corrupt or truncated; download it again";
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    throw_bad_input(path, std::string("cannot open safetensors file: ") + std::strerror(errno),
                    "check the path");
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw_bad_input(path, "not a regular file", "give the path of a .safetensors file");
  }
  map_size_ = static_cast<size_t>(st.st_size);
  if (map_size_ < 8) {
    ::close(fd);
    throw_bad_input(path, "file has " + std::to_string(map_size_) +
                              " bytes, fewer than the 8-byte safetensors header length", hint_corrupt);
  }
  // Read-only: tensors that alias the mapping must never be written (a write faults), so
  // their pages are always the file's and can be dropped and read back (discard).
  map_ = ::mmap(nullptr, map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    throw Error(ErrorKind::Runtime, path, std::string("mmap failed: ") + std::strerror(errno));
  }
  try {
    const auto* base = static_cast<const uint8_t*>(map_);
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | base[i];  // little endian
    if (header_len > map_size_ - 8 || header_len > kMaxHeaderBytes)
      throw_bad_input(path, "header length " + std::to_string(header_len) + " runs past the end of the " +
                                std::to_string(map_size_) + "-byte file", hint_corrupt);
    const char* hbegin = reinterpret_cast<const char*>(base + 8);
    nlohmann::json header = nlohmann::json::parse(hbegin, hbegin + header_len, nullptr, false);
    if (header.is_discarded() || !header.is_object())
      throw_bad_input(path, "header is not a well-formed JSON object", hint_corrupt);
    const uint8_t* data = base + 8 + header_len;
    const uint64_t data_size = map_size_ - 8 - header_len;

    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& name = it.key();
      const nlohmann::json& entry = it.value();
      if (name == "__metadata__") {
        if (!entry.is_object())
          throw_bad_input(path, "__metadata__ is not an object", hint_corrupt);
        for (auto m = entry.begin(); m != entry.end(); ++m) {
          if (!m.value().is_string())
            throw_bad_input(path, "__metadata__ value '" + m.key() + "' is not a string", hint_corrupt);
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      const std::string where = "tensor '" + name + "'";
      if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") ||
          !entry.contains("data_offsets"))
        throw_bad_input(path, where + " lacks dtype, shape or data_offsets", hint_corrupt);
      TensorView t;
      t.name = name;
      if (!entry["dtype"].is_string() || !parse_dtype(entry["dtype"].get<std::string>(), &t.dtype))
        throw_unsupported(path, where + " has dtype " + entry["dtype"].dump() +
                                    "; supported are F32, F16, BF16, I64, U8",
                          "convert the checkpoint to float16 or float32");
      const auto& shape = entry["shape"];
      if (!shape.is_array())
        throw_bad_input(path, where + " shape is not a list", hint_corrupt);
      uint64_t numel = 1;
      for (const auto& d : shape) {
        if (!d.is_number_unsigned())
          throw_bad_input(path, where + " shape " + shape.dump() + " has a non-integer or negative dimension",
                          hint_corrupt);
        uint64_t dim = d.get<uint64_t>();
        if (dim != 0 && numel > data_size / dim)
          throw_bad_input(path, where + " shape " + shape.dump() + " is larger than the data section",
                          hint_corrupt);
        numel *= dim;
        t.shape.push_back(static_cast<int64_t>(dim));
      }
      const auto& off = entry["data_offsets"];
      if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
        throw_bad_input(path, where + " data_offsets " + off.dump() + " is not a pair of offsets", hint_corrupt);
      const uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
      if (begin > end || end > data_size)
        throw_bad_input(path, where + " data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                                  "] lie outside the " + std::to_string(data_size) + "-byte data section",
                        hint_corrupt);
      const uint64_t expected = numel * dtype_size(t.dtype);
      if (end - begin != expected)
        throw_bad_input(path, where + " has " + std::to_string(end - begin) + " bytes of data but shape " +
                                  shape.dump() + " x " + dtype_name(t.dtype) + " needs " +
                                  std::to_string(expected),
                        hint_corrupt);
      t.data = data + begin;
      t.nbytes = end - begin;
      tensors_.push_back(std::move(t));
    }
    // Tensors must tile the data section in order without overlap.
    std::sort(tensors_.begin(), tensors_.end(),
              [](const TensorView& a, const TensorView& b) { return a.data < b.data; });
    const uint8_t* cursor = data;
    for (const auto& t : tensors_) {
      if (t.data < cursor)
        throw_bad_input(path, "tensor '" + t.name + "' overlaps the tensor before it in the data section",
                        hint_corrupt);
      if (t.data > cursor)
        throw_bad_input(path, "the data section has " + std::to_string(t.data - cursor) +
                                  " unused bytes before tensor '" + t.name + "'", hint_corrupt);
      cursor = t.data + t.nbytes;
    }
    if (cursor != data + data_size)
      throw_bad_input(path, "the data section has " + std::to_string(data + data_size - cursor) +
                                " bytes after the last tensor", hint_corrupt);
    for (size_t i = 0; i < tensors_.size(); ++i) index_[tensors_[i].name] = i;
  } catch (...) {
    release();
    throw;
  }
}

SafeTensors::~SafeTensors() { release(); }

void SafeTensors::release() {
  if (map_) ::munmap(map_, map_size_);
  map_ = nullptr;
  map_size_ = 0;
}

SafeTensors::SafeTensors(SafeTensors&& other) noexcept { *this = std::move(other); }

SafeTensors& SafeTensors::operator=(SafeTensors&& other) noexcept {
  if (this != &other) {
    release();
    path_ = std::move(other.path_);
    map_ = std::exchange(other.map_, nullptr);
    map_size_ = std::exchange(other.map_size_, 0);
    tensors_ = std::move(other.tensors_);
    index_ = std::move(other.index_);
    metadata_ = std::move(other.metadata_);
  }
  return *this;
}

const TensorView* SafeTensors::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const TensorView& SafeTensors::at(const std::string& name) const {
  const TensorView* t = find(name);
  if (!t) throw_bad_input(path_, "has no tensor named '" + name + "'");
  return *t;
}

namespace {

// The whole pages inside [data, data + nbytes): [begin, end), page aligned, maybe empty.
std::pair<uintptr_t, uintptr_t> whole_pages(const uint8_t* data, size_t nbytes) {
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + page - 1) / page * page;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + nbytes) / page * page;
  return {begin, std::max(begin, end)};
}

}  // namespace

void SafeTensors::prefault(const TensorView& view) const {
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  // Linux 5.14
#endif
  // Pages partly outside the tensor are included: the range is widened to whole pages.
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(view.data) / page * page;
  const uintptr_t end = reinterpret_cast<uintptr_t>(view.data) + view.nbytes;
  if (view.nbytes == 0) return;
  (void)::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_READ);
}

void SafeTensors::discard(const TensorView& view) const {
  // Only pages wholly inside the tensor (a neighbour may be in use). The mapping is
  // read-only, so a dropped page is the file's and reads back unchanged.
  const auto [begin, end] = whole_pages(view.data, view.nbytes);
  if (end > begin) (void)::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

void write_safetensors(const std::string& path, const std::vector<TensorBytes>& tensors,
                       const std::map<std::string, std::string>& metadata, const std::string& owner) {
  std::vector<const TensorBytes*> sorted;
  for (const auto& t : tensors) sorted.push_back(&t);
  std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->name < b->name; });

  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const TensorBytes* t : sorted) {
    int64_t numel = 1;
    for (int64_t d : t->shape) numel *= d;
    if (t->nbytes != static_cast<size_t>(numel) * dtype_size(t->dtype))
      throw Error(ErrorKind::Runtime, path, "tensor '" + t->name + "' has the wrong number of bytes for its shape");
    header[t->name] = {{"dtype", dtype_name(t->dtype)}, {"shape", t->shape}, {"data_offsets", {offset, offset + t->nbytes}}};
    offset += t->nbytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // align the data section
  std::string prefix;
  const uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) prefix.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  prefix += text;
  AtomicFileWriter file(path, owner);
  file.write(prefix.data(), prefix.size());
  for (const TensorBytes* t : sorted) file.write(t->data, t->nbytes);
  file.commit();
}

void write_safetensors(const std::string& path, const std::vector<TensorData>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<TensorBytes> views;
  views.reserve(tensors.size());
  for (const auto& t : tensors) views.push_back({t.name, t.dtype, t.shape, t.bytes.data(), t.bytes.size()});
  write_safetensors(path, views, metadata, "");
}

}  // namespace fairdiff
