// The weights cache (src/io/weights_cache.h): a load that converts stores its weights, the
// next one maps them; a changed source, a broken entry or a full cache never stops a load.
#include <c10/core/InferenceMode.h>
#include <torch/nn/module.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>

#include "fairdiff/generate.h"
#include "fairdiff/model.h"
#include "model_folder.h"
#include "single_file.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace fairdiff {
namespace {

const std::string kToy = std::string(FAIRDIFF_SOURCE_DIR) + "/models/toy";

LoadOptions bf16_cached(const std::string& dir, uint64_t max_bytes = uint64_t{1} << 30) {
  LoadOptions o;
  o.prepack_convolutions = false;
  o.dtype = at::kBFloat16;
  o.weights_cache.dir = dir;
  o.weights_cache.max_bytes = max_bytes;
  return o;
}

// Loads, and waits until the entries it stores are written.
StableDiffusionModel load_and_store(const std::string& folder, const LoadOptions& o) {
  StableDiffusionModel m = load_model_folder(folder, o);
  if (m.cache_writes.valid()) m.cache_writes.get();
  return m;
}

std::map<std::string, uintmax_t> entries(const std::string& dir) {
  std::map<std::string, uintmax_t> found;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) found[e.path().filename().string()] = e.file_size();
  return found;
}

std::string entry_of(const std::string& cache_dir, const std::string& source, const std::string& component,
                     at::ScalarType dtype = at::kBFloat16) {
  WeightsCache cache;
  cache.dir = cache_dir;
  return fs::path(cached_weights_path(cache, cached_weights_key(source, component, dtype))).filename().string();
}

std::vector<std::pair<std::string, at::Tensor>> tensors_of(torch::nn::Module& m) {
  std::vector<std::pair<std::string, at::Tensor>> all;
  for (const auto& p : m.named_parameters(true)) all.emplace_back(p.key(), p.value());
  for (const auto& b : m.named_buffers(true)) all.emplace_back(b.key(), b.value());
  return all;
}

// Every tensor of `got` equals `want`'s, in dtype and bit for bit.
void expect_same_tensors(torch::nn::Module& got, torch::nn::Module& want, const std::string& what) {
  const auto g = tensors_of(got), w = tensors_of(want);
  ASSERT_EQ(g.size(), w.size()) << what;
  for (size_t i = 0; i < g.size(); ++i) {
    ASSERT_EQ(g[i].first, w[i].first) << what;
    EXPECT_EQ(g[i].second.scalar_type(), w[i].second.scalar_type()) << what << ": " << g[i].first;
    EXPECT_TRUE(at::equal(g[i].second, w[i].second)) << what << ": " << g[i].first;
  }
}

// Whether every tensor of the component is a view of an entry of the cache in `dir`.
bool from_cache(StableDiffusionModel& m, torch::nn::Module& module, const std::string& component,
                const std::string& dir) {
  const MappedWeights& w = m.mapped.at(component);
  size_t bytes = 0;
  for (const auto& [name, t] : tensors_of(module)) bytes += t.nbytes();
  return w.file() && fs::path(w.file()->path()).parent_path() == fs::path(dir) && w.bytes() == bytes;
}

TEST(WeightsCache, ASecondConvertingLoadMapsTheFirstOnesWeights) {
  c10::InferenceMode guard;
  test::TempDir tmp;
  const std::string dir = tmp / "weights";
  const LoadOptions o = bf16_cached(dir);
  StableDiffusionModel first = load_and_store(kToy, o);
  EXPECT_FALSE(from_cache(first, *first.unet, "unet", dir));
  const auto stored = entries(dir);
  ASSERT_EQ(stored.size(), 3u);
  for (const std::string component : {"text_encoder", "unet", "vae"})
    EXPECT_EQ(stored.count(entry_of(dir, model_weights(kToy, component), component)), 1u) << component;

  StableDiffusionModel second = load_model_folder(kToy, o);
  EXPECT_FALSE(second.cache_writes.valid()) << "nothing missed, nothing to write";
  EXPECT_TRUE(from_cache(second, *second.text_encoder, "text_encoder", dir));
  EXPECT_TRUE(from_cache(second, *second.unet, "unet", dir));
  EXPECT_TRUE(from_cache(second, *second.vae, "vae", dir));
  expect_same_tensors(*second.text_encoder, *first.text_encoder, "text_encoder");
  expect_same_tensors(*second.unet, *first.unet, "unet");
  expect_same_tensors(*second.vae, *first.vae, "vae");

  // A load that converts nothing (float32 from float32 files) maps its files, as always.
  LoadOptions f32 = o;
  f32.dtype = at::kFloat;
  StableDiffusionModel plain = load_and_store(kToy, f32);
  EXPECT_FALSE(from_cache(plain, *plain.unet, "unet", dir));
  EXPECT_EQ(entries(dir), stored);
}

TEST(WeightsCache, AChangedSourceOrABrokenEntryIsConvertedAgain) {
  c10::InferenceMode guard;
  test::TempDir tmp;
  const std::string model = tmp / "toy", dir = tmp / "weights";
  fs::copy(kToy, model, fs::copy_options::recursive);
  const LoadOptions o = bf16_cached(dir);
  LoadOptions uncached = o;
  uncached.weights_cache.dir.clear();
  StableDiffusionModel want = load_model_folder(model, uncached);
  EXPECT_FALSE(want.cache_writes.valid());
  EXPECT_TRUE(entries(dir).empty());
  load_and_store(model, o);

  // Another version of the UNet's file (its modification time moved): converted and stored again.
  const std::string unet_file = model_weights(model, "unet");
  fs::last_write_time(unet_file, fs::last_write_time(unet_file) + std::chrono::seconds(5));
  StableDiffusionModel changed = load_and_store(model, o);
  EXPECT_FALSE(from_cache(changed, *changed.unet, "unet", dir));
  EXPECT_TRUE(from_cache(changed, *changed.vae, "vae", dir));
  expect_same_tensors(*changed.unet, *want.unet, "unet");
  StableDiffusionModel again = load_model_folder(model, o);
  EXPECT_TRUE(from_cache(again, *again.unet, "unet", dir)) << "the new version's entry";

  // A truncated entry (a full disk, a copy cut short): removed, converted, stored whole.
  const std::string vae_entry = dir + "/" + entry_of(dir, model_weights(model, "vae"), "vae");
  fs::resize_file(vae_entry, fs::file_size(vae_entry) / 2);
  StableDiffusionModel truncated = load_model_folder(model, o);
  EXPECT_FALSE(from_cache(truncated, *truncated.vae, "vae", dir));
  expect_same_tensors(*truncated.vae, *want.vae, "vae");
  truncated.cache_writes.get();

  // An entry that opens but lacks a tensor of the module (written by hand here): the same.
  {
    const SafeTensors whole(vae_entry);
    std::vector<TensorBytes> fewer;
    for (const TensorView& v : whole.tensors())
      if (&v != &whole.tensors().front()) fewer.push_back({v.name, v.dtype, v.shape, v.data, v.nbytes});
    write_safetensors(vae_entry + ".partial", fewer, whole.metadata(), "");
  }
  fs::rename(vae_entry + ".partial", vae_entry);
  StableDiffusionModel partial = load_and_store(model, o);
  EXPECT_FALSE(from_cache(partial, *partial.vae, "vae", dir));
  expect_same_tensors(*partial.vae, *want.vae, "vae");
  StableDiffusionModel whole = load_model_folder(model, o);
  EXPECT_TRUE(from_cache(whole, *whole.vae, "vae", dir));
  expect_same_tensors(*whole.vae, *want.vae, "vae");
}

TEST(WeightsCache, KeepsTheMostRecentlyLoadedWithinItsSize) {
  c10::InferenceMode guard;
  test::TempDir tmp;
  load_and_store(kToy, bf16_cached(tmp / "roomy"));
  uintmax_t total = 0;
  for (const auto& [name, bytes] : entries(tmp / "roomy")) total += bytes;
  // One byte short of all three: the first written (the text encoder's) goes when the last is.
  const std::string dir = tmp / "tight";
  load_and_store(kToy, bf16_cached(dir, total - 1));
  const auto kept = entries(dir);
  EXPECT_EQ(kept.size(), 2u);
  EXPECT_EQ(kept.count(entry_of(dir, model_weights(kToy, "text_encoder"), "text_encoder")), 0u);
  EXPECT_EQ(kept.count(entry_of(dir, model_weights(kToy, "unet"), "unet")), 1u);
  EXPECT_EQ(kept.count(entry_of(dir, model_weights(kToy, "vae"), "vae")), 1u);
  // An entry larger than the whole cache is not written at all.
  const std::string small = tmp / "small";
  load_and_store(kToy, bf16_cached(small, 1024));
  EXPECT_TRUE(entries(small).empty());
  // Nor with --prepack-weights, which replaces the loaded weights at once; unless, as on a CPU
  // without AVX-512, oneDNN cannot reorder bf16 weights, so that the loaded ones stay.
  LoadOptions packed = bf16_cached(tmp / "packed");
  packed.prepack_convolutions = true;
  StableDiffusionModel p = load_model_folder(kToy, packed);
  const bool written = !leaf::onednn_reorders(at::kBFloat16);
  EXPECT_EQ(p.cache_writes.valid(), written);
  if (written) p.cache_writes.wait();
  EXPECT_EQ(entries(tmp / "packed").size(), written ? 3u : 0u);
}

TEST(WeightsCache, EntriesOfADeletedModelGoWhenTheNextIsWritten) {
  c10::InferenceMode guard;
  test::TempDir tmp;
  const std::string copy = tmp / "copy", dir = tmp / "weights";
  fs::copy(kToy, copy, fs::copy_options::recursive);
  load_and_store(copy, bf16_cached(dir));
  ASSERT_EQ(entries(dir).size(), 3u);
  fs::remove_all(copy);
  load_and_store(kToy, bf16_cached(dir));
  const auto kept = entries(dir);
  EXPECT_EQ(kept.size(), 3u);
  for (const std::string component : {"text_encoder", "unet", "vae"})
    EXPECT_EQ(kept.count(entry_of(dir, model_weights(kToy, component), component)), 1u) << component;
}

// A single-file checkpoint's entries hold the module's tensors (after the key conversion
// and the q/k/v split): the tiny float16 checkpoint loaded as float32.
TEST(WeightsCache, SingleFileCheckpointsToo) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  c10::InferenceMode guard;
  test::TempDir tmp;
  const std::string checkpoint = fixtures + "/models/tiny-sd1-single-file/tiny-sd1.fp16.safetensors";
  const std::string tokenizer = fixtures + "/models/tiny-sd1/tokenizer";
  LoadOptions o = bf16_cached(tmp / "weights");
  o.dtype = at::kFloat;
  StableDiffusionModel first = load_single_file(checkpoint, tokenizer, o);
  first.cache_writes.get();
  EXPECT_EQ(entries(tmp / "weights").size(), 3u);
  StableDiffusionModel second = load_single_file(checkpoint, tokenizer, o);
  EXPECT_TRUE(from_cache(second, *second.text_encoder, "text_encoder", tmp / "weights"));
  EXPECT_TRUE(from_cache(second, *second.unet, "unet", tmp / "weights"));
  EXPECT_TRUE(from_cache(second, *second.vae, "vae", tmp / "weights"));
  expect_same_tensors(*second.text_encoder, *first.text_encoder, "text_encoder");
  expect_same_tensors(*second.unet, *first.unet, "unet");
  expect_same_tensors(*second.vae, *first.vae, "vae");
}

// Sets an environment variable for the scope, then restores it.
struct ScopedEnv {
  std::string name;
  std::optional<std::string> old;
  ScopedEnv(std::string n, const char* value) : name(std::move(n)) {
    if (const char* v = std::getenv(name.c_str())) old = v;
    if (value)
      setenv(name.c_str(), value, 1);
    else
      unsetenv(name.c_str());
  }
  ~ScopedEnv() {
    if (old)
      setenv(name.c_str(), old->c_str(), 1);
    else
      unsetenv(name.c_str());
  }
};

TEST(WeightsCache, TheDefaultFolderAndSize) {
  ScopedEnv dir("FAIRDIFF_CACHE_DIR", "/somewhere");
  {
    ScopedEnv gb("FAIRDIFF_WEIGHTS_CACHE_GB", nullptr);
    const WeightsCache c = default_weights_cache();
    EXPECT_EQ(c.dir, "/somewhere/weights");
    EXPECT_EQ(c.max_bytes, uint64_t{16} << 30);
    EXPECT_TRUE(c.enabled());
  }
  {
    ScopedEnv gb("FAIRDIFF_WEIGHTS_CACHE_GB", "0.5");
    EXPECT_EQ(default_weights_cache().max_bytes, uint64_t{512} << 20);
  }
  {
    ScopedEnv gb("FAIRDIFF_WEIGHTS_CACHE_GB", "0");
    EXPECT_FALSE(default_weights_cache().enabled());
  }
  for (const char* bad : {"lots", "-1", "2GB"}) {
    ScopedEnv gb("FAIRDIFF_WEIGHTS_CACHE_GB", bad);
    test::expect_error([] { default_weights_cache(); }, ErrorKind::BadInput,
                       {"FAIRDIFF_WEIGHTS_CACHE_GB", bad, "gigabytes"});
  }
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// generate end to end: the run that fills the cache and the run that maps it write the same
// bytes; --no-weights-cache (weights_cache = false) neither reads nor writes it.
TEST(WeightsCache, GenerateFromTheCacheWritesTheSameImages) {
  test::TempDir tmp;
  ScopedEnv dir("FAIRDIFF_CACHE_DIR", (tmp / "cache").c_str());
  ScopedEnv gb("FAIRDIFF_WEIGHTS_CACHE_GB", nullptr);
  configure_process(1);
  GenerateOptions o;
  o.model = kToy;
  o.prompt = "a red kite";
  o.images_per_prompt = 1;
  o.steps = 3;
  o.seed = 7;
  o.dtype = "bf16";
  o.device = "cpu";
  o.quiet = true;
  GenerateOptions off = o;
  off.weights_cache = false;
  off.out_dir = tmp / "off";
  generate(off);
  EXPECT_FALSE(fs::exists(tmp / "cache/weights"));
  o.out_dir = tmp / "filling";
  generate(o);
  EXPECT_EQ(entries(tmp / "cache/weights").size(), 3u);
  GenerateOptions mapped = o;
  mapped.out_dir = tmp / "mapped";
  generate(mapped);
  const std::string png = "00000-7.png";
  ASSERT_TRUE(fs::exists(tmp / "filling/" + png));
  EXPECT_EQ(slurp(tmp / "mapped/" + png), slurp(tmp / "filling/" + png));
  EXPECT_EQ(slurp(tmp / "off/" + png), slurp(tmp / "filling/" + png));
}

}  // namespace
}  // namespace fairdiff
