// Model folders: strict loading, clear errors for every bad input, dtype conversion.
#include <c10/core/InferenceMode.h>

#include <sys/resource.h>

#include <filesystem>
#include <fstream>

#include "config_json.h"
#include "model_folder.h"
#include "tensor_io.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace fairdiff {
namespace {

// A copy of fixtures/models/tiny-sd1 made of symlinks, so one component can be
// replaced by a broken one without copying the weights.
struct ModelCopy {
  test::TempDir tmp;
  std::string dir;
  explicit ModelCopy(const std::string& fixtures) {
    const fs::path src = fs::path(fixtures) / "models" / "tiny-sd1";
    dir = tmp / "model";
    fs::create_directory(dir);
    for (const auto& component : fs::directory_iterator(src)) {
      const fs::path dst = fs::path(dir) / component.path().filename();
      if (component.is_directory()) {
        fs::create_directory(dst);
        for (const auto& f : fs::directory_iterator(component.path())) fs::create_symlink(f.path(), dst / f.path().filename());
      } else {
        fs::create_symlink(component.path(), dst);
      }
    }
  }
  std::string path(const std::string& rel) const { return dir + "/" + rel; }
  // Replaces a JSON file with `edit` applied to its contents.
  void edit_json(const std::string& rel, const std::function<void(nlohmann::json&)>& edit) const {
    nlohmann::json j = read_json_file(path(rel));
    edit(j);
    fs::remove(path(rel));
    std::ofstream(path(rel)) << j.dump(1);
  }
  void write(const std::string& rel, const std::string& text) const {
    fs::remove(path(rel));
    std::ofstream(path(rel)) << text;
  }
};

TEST(ModelFolder, LoadsTinySd1) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  c10::InferenceMode guard;
  StableDiffusionModel m = load_model_folder(fixtures + "/models/tiny-sd1", LoadOptions{});
  EXPECT_EQ(m.index.class_name, "StableDiffusionPipeline");
  EXPECT_EQ(m.unet->config().cross_attention_dim, (std::vector<int64_t>{32, 32, 32, 32}));
  EXPECT_GT(parameter_count(*m.unet), 0);
  EXPECT_EQ(m.scheduler_config.value("_class_name", ""), "PNDMScheduler");
}

TEST(ModelFolder, MissingFolderAndComponent) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  test::expect_error([] { load_model_folder("/nonexistent/model", {}); }, ErrorKind::BadInput,
                     {"/nonexistent/model", "model folder not found"});
  ModelCopy copy(fixtures);
  fs::remove_all(copy.path("unet"));
  test::expect_error([&] { load_model_folder(copy.dir, {}); }, ErrorKind::BadInput, {"unet", "is missing"});
}

TEST(ModelFolder, InvalidJsonConfig) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  ModelCopy copy(fixtures);
  copy.write("unet/config.json", "{\"block_out_channels\": [32, 64,");
  test::expect_error([&] { load_model_folder(copy.dir, {}); }, ErrorKind::BadInput,
                     {"unet/config.json", "not valid JSON"});
  copy.write("model_index.json", "[1, 2]");
  test::expect_error([&] { load_model_folder(copy.dir, {}); }, ErrorKind::BadInput,
                     {"model_index.json", "not a JSON object"});
}

TEST(ModelFolder, WrongTypeInConfig) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  ModelCopy copy(fixtures);
  copy.edit_json("text_encoder/config.json", [](nlohmann::json& j) { j["hidden_size"] = "wide"; });
  test::expect_error([&] { load_text_encoder(copy.path("text_encoder"), {}); }, ErrorKind::BadInput,
                     {"text_encoder/config.json", "hidden_size", "wrong type"});
}

TEST(ModelFolder, UnsupportedConfigValues) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  ModelCopy copy(fixtures);
  copy.edit_json("text_encoder/config.json", [](nlohmann::json& j) { j["hidden_act"] = "relu"; });
  test::expect_error([&] { load_text_encoder(copy.path("text_encoder"), {}); }, ErrorKind::Unsupported,
                     {"text_encoder/config.json", "hidden_act = \"relu\"", "quick_gelu"});
  copy.edit_json("unet/config.json", [](nlohmann::json& j) { j["addition_embed_type"] = "text_image"; });
  test::expect_error([&] { load_unet(copy.path("unet"), {}); }, ErrorKind::Unsupported,
                     {"unet/config.json", "addition_embed_type = \"text_image\"", "text_time"});
  // An SDXL text_time UNet without its projection sizes is refused by name.
  copy.edit_json("unet/config.json", [](nlohmann::json& j) { j["addition_embed_type"] = "text_time"; });
  test::expect_error([&] { load_unet(copy.path("unet"), {}); }, ErrorKind::BadInput,
                     {"unet/config.json", "needs addition_time_embed_dim"});
  // An SD 1.x folder relabelled SDXL lacks the second encoder: said by name.
  copy.edit_json("model_index.json", [](nlohmann::json& j) { j["_class_name"] = "StableDiffusionXLPipeline"; });
  test::expect_error([&] { read_model_index(copy.dir); }, ErrorKind::BadInput,
                     {"model_index.json", "lists no text_encoder_2 component", "SDXL"});
}

TEST(ModelFolder, StrictKeys) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  c10::InferenceMode guard;
  test::TempDir tmp;
  const SafeTensors good(fixtures + "/models/tiny-sd1/text_encoder/model.safetensors");
  const std::string cfg_path = fixtures + "/models/tiny-sd1/text_encoder/config.json";
  const CLIPTextConfig cfg = CLIPTextConfig::from_json(read_json_file(cfg_path), cfg_path);
  // Rewrite the file without one tensor, with one extra, and with one reshaped.
  auto rewrite = [&](const std::string& name, auto&& change) {
    std::vector<TensorData> out;
    for (const auto& t : good.tensors()) {
      TensorData d{t.name, t.dtype, t.shape, std::vector<uint8_t>(t.data, t.data + t.nbytes)};
      if (change(d)) out.push_back(std::move(d));
    }
    write_safetensors(tmp / name, out);
    return tmp / name;
  };
  const auto missing = rewrite("missing.safetensors", [](TensorData& d) { return d.name != "text_model.final_layer_norm.bias"; });
  const auto extra = rewrite("extra.safetensors", [](TensorData& d) {
    if (d.name == "text_model.final_layer_norm.bias") d.name = "text_model.final_layer_norm.bias_extra";
    return true;
  });
  const auto reshaped = rewrite("reshaped.safetensors", [](TensorData& d) {
    if (d.name == "text_model.embeddings.position_embedding.weight") d.shape = {d.shape[1], d.shape[0]};
    return true;
  });
  CLIPTextModel model(cfg);
  test::expect_error([&] { load_state_dict(*model, SafeTensors(missing), "text_encoder"); }, ErrorKind::BadInput,
                     {"missing.safetensors", "1 text_encoder tensors are missing", "final_layer_norm.bias"});
  test::expect_error([&] { load_state_dict(*model, SafeTensors(extra), "text_encoder"); }, ErrorKind::BadInput,
                     {"extra.safetensors", "final_layer_norm.bias"});
  test::expect_error([&] { load_state_dict(*model, SafeTensors(reshaped), "text_encoder"); }, ErrorKind::BadInput,
                     {"reshaped.safetensors", "wrong shape", "position_embedding.weight (file [32,77], model [77,32])"});
}

TEST(ModelFolder, HalfCheckpointLoadsIntoRequestedDtype) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  c10::InferenceMode guard;
  ModelCopy copy(fixtures);
  // Write the text encoder as an F16 file, then load it as float32 and as float16.
  const SafeTensors f32(fixtures + "/models/tiny-sd1/text_encoder/model.safetensors");
  std::vector<TensorData> half;
  for (const auto& t : f32.tensors()) {
    const at::Tensor h = tensor_view(t).to(at::kHalf).contiguous();
    const auto* p = static_cast<const uint8_t*>(h.data_ptr());
    half.push_back({t.name, DType::F16, t.shape, std::vector<uint8_t>(p, p + h.nbytes())});
  }
  fs::remove(copy.path("text_encoder/model.safetensors"));
  write_safetensors(copy.path("text_encoder/model.fp16.safetensors"), half);
  MappedWeights mapped_f32, mapped_f16;
  const CLIPTextModel as_f32 = load_text_encoder(copy.path("text_encoder"), {at::kFloat, at::kCPU}, &mapped_f32);
  const CLIPTextModel as_f16 = load_text_encoder(copy.path("text_encoder"), {at::kHalf, at::kCPU}, &mapped_f16);
  EXPECT_TRUE(mapped_f32.empty());   // converted: copies (and the file's pages dropped)
  EXPECT_FALSE(mapped_f16.empty());  // the file's own dtype: views of the mapping
  const at::Tensor w = as_f32->named_parameters()["text_model.final_layer_norm.weight"];
  EXPECT_EQ(w.scalar_type(), at::kFloat);
  EXPECT_EQ(as_f16->named_parameters()["text_model.final_layer_norm.weight"].scalar_type(), at::kHalf);
  const at::Tensor ref = tensor_view(f32.at("text_model.final_layer_norm.weight"));
  EXPECT_TRUE(at::allclose(w, ref, 0, 1e-3));
}

// A float32 folder loaded as float32 on the CPU: the weights are the file's bytes (no
// copy), paging a component out and in changes no number, and use() keeps only the running
// component resident.
TEST(ModelFolder, WeightsAliasTheFileAndPagingChangesNothing) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  c10::InferenceMode guard;
  LoadOptions plain;
  plain.prepack_convolutions = false;  // every weight a view of the file
  StableDiffusionModel m = load_model_folder(fixtures + "/models/tiny-sd1", plain);
  ASSERT_EQ(m.mapped.size(), 3u);
  for (const auto& [name, weights] : m.mapped) EXPECT_FALSE(weights.empty()) << name;
  const SafeTensors* file = m.mapped.at("unet").file();
  size_t bytes = 0;
  for (const auto& p : m.unet->named_parameters()) {
    const TensorView& stored = file->at(p.key());
    EXPECT_EQ(p.value().data_ptr(), static_cast<const void*>(stored.data)) << p.key() << " is a copy";
    bytes += stored.nbytes;
  }
  EXPECT_EQ(m.mapped.at("unet").bytes(), bytes);

  at::manual_seed(0);
  const at::Tensor x = at::randn({2, 4, 8, 8}), context = at::randn({2, 77, 32});
  const at::Tensor t = at::scalar_tensor(500.0);
  const at::Tensor before = m.unet->forward(x, t, context);
  ASSERT_TRUE(m.page_out_idle);
  m.use("vae");  // pages the UNet and the text encoder out
  EXPECT_FALSE(m.mapped.at("unet").resident());
  EXPECT_FALSE(m.mapped.at("text_encoder").resident());
  EXPECT_TRUE(m.mapped.at("vae").resident());
  // Paged-out weights still read correctly (each page reads back from the file) ...
  EXPECT_TRUE(at::equal(m.unet->forward(x, t, context), before));
  // ... and after page_in.
  m.use("unet");
  EXPECT_TRUE(m.mapped.at("unet").resident());
  EXPECT_FALSE(m.mapped.at("vae").resident());
  EXPECT_TRUE(at::equal(m.unet->forward(x, t, context), before));

  LoadOptions resident;
  resident.page_out_idle = false;
  resident.prepack_convolutions = false;
  StableDiffusionModel r = load_model_folder(fixtures + "/models/tiny-sd1", resident);
  r.use("unet");
  for (const auto& [name, weights] : r.mapped) EXPECT_TRUE(weights.resident()) << name;
}

// The networks are built with placeholder weights (leaf::PlaceholderParameters) and the load
// replaces every one: as views of the file, or as copies in another dtype. On the shipped model.
TEST(ModelFolder, NoPlaceholderWeightOutlivesTheLoad) {
  c10::InferenceMode guard;
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    LoadOptions o;
    o.prepack_convolutions = false;
    o.dtype = dtype;
    StableDiffusionModel m = load_model_folder(std::string(FAIRDIFF_SOURCE_DIR) + "/models/toy", o);
    for (torch::nn::Module* module : {static_cast<torch::nn::Module*>(m.text_encoder.get()),
                                      static_cast<torch::nn::Module*>(m.unet.get()),
                                      static_cast<torch::nn::Module*>(m.vae.get())})
      for (const auto& p : module->named_parameters()) {
        const at::Tensor& w = p.value();
        EXPECT_TRUE(w.is_contiguous()) << p.key();
        EXPECT_GE(w.storage().nbytes(), static_cast<size_t>(w.numel()) * w.element_size()) << p.key();
      }
  }
}

// A bf16 load of a float32 folder converts every weight once, into one mapping per file
// (tensor_io.cpp, CopyArena: huge pages for the fresh memory), with the numbers of .to(bf16).
TEST(ModelFolder, ConvertedWeightsAreOneMappingWithTheNumbersOfTo) {
  c10::InferenceMode guard;
  LoadOptions o;
  o.prepack_convolutions = false;
  const std::string dir = std::string(FAIRDIFF_SOURCE_DIR) + "/models/toy";
  const StableDiffusionModel f32 = load_model_folder(dir, o);
  o.dtype = at::kBFloat16;
  const StableDiffusionModel b16 = load_model_folder(dir, o);
  const auto want = f32.unet->named_parameters();
  uintptr_t lo = UINTPTR_MAX, hi = 0;
  size_t bytes = 0;
  for (const auto& p : b16.unet->named_parameters()) {
    const at::Tensor& w = p.value();
    ASSERT_EQ(w.scalar_type(), at::kBFloat16) << p.key();
    EXPECT_TRUE(at::equal(w, want[p.key()].to(at::kBFloat16))) << p.key();
    const auto begin = reinterpret_cast<uintptr_t>(w.data_ptr());
    EXPECT_EQ(begin % 64, 0u) << p.key();
    lo = std::min(lo, begin);
    hi = std::max(hi, begin + static_cast<uintptr_t>(w.nbytes()));
    bytes += (w.nbytes() + 63) / 64 * 64;
  }
  // One block no longer than the copies (64-byte aligned, back to back): heap allocations
  // of their own would leave the allocator's headers and alignment between them.
  EXPECT_LE(hi - lo, bytes);
}

// The address space this process has mapped (VmSize of /proc/self/status), in bytes.
size_t mapped_bytes() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind("VmSize:", 0) == 0) return std::stoull(line.substr(7)) * 1024;  // "VmSize:  123 kB"
  return 0;
}

// A converting load whose copies cannot be mapped (tensor_io.cpp, CopyArena) is one clear
// error naming the size and the way out, and the module keeps the weights it had. The
// address space is held to what is mapped already plus 8 MiB, so that the copies' mapping
// (16 MiB of bf16, and 2 MiB for the huge-page alignment) is what fails, after the file was mapped.
TEST(ModelFolder, ConvertedWeightsWithoutMemoryAreOneClearError) {
  c10::InferenceMode guard;
  test::TempDir tmp;
  constexpr int64_t kFloats = int64_t{8} << 20;  // 32 MiB as float32 in the file, 16 MiB as bf16
  struct Weights : torch::nn::Module {
    at::Tensor weight = register_parameter("weight", torch::zeros({kFloats}), false);
  };
  Weights module;
  {
    const at::Tensor ones = torch::ones({kFloats});
    const auto* data = static_cast<const uint8_t*>(ones.data_ptr());
    write_safetensors(tmp / "big.safetensors",
                      std::vector<TensorData>{{"weight", DType::F32, {kFloats}, std::vector<uint8_t>(data, data + ones.nbytes())}});
  }
  const SafeTensors file(tmp / "big.safetensors");

  rlimit before{};
  ASSERT_EQ(getrlimit(RLIMIT_AS, &before), 0);
  const size_t now = mapped_bytes();
  ASSERT_GT(now, 0u);
  rlimit held = before;
  held.rlim_cur = now + (size_t{8} << 20);
  ASSERT_EQ(setrlimit(RLIMIT_AS, &held), 0);
  try {
    test::expect_error([&] { load_state_dict(module, file, "weights", at::kBFloat16); }, ErrorKind::Runtime,
                       {"no memory for the 16 MiB of converted weights", "--dtype"});
  } catch (...) {
    setrlimit(RLIMIT_AS, &before);
    throw;
  }
  ASSERT_EQ(setrlimit(RLIMIT_AS, &before), 0);
  EXPECT_EQ(module.weight.scalar_type(), at::kFloat);
  EXPECT_EQ(module.weight.sum().item<double>(), 0.0) << "the failed load changed the module's weight";
  // With the address space back, the same load converts.
  load_state_dict(module, file, "weights", at::kBFloat16);
  EXPECT_EQ(module.weight.scalar_type(), at::kBFloat16);
  EXPECT_EQ(module.weight.to(at::kFloat).sum().item<double>(), static_cast<double>(kFloats));  // exact in float
}

// The default load options with every weight a view of the file (no prepacking).
LoadOptions unpacked() {
  LoadOptions o;
  o.prepack_convolutions = false;
  return o;
}

// With page_out_idle (the default) nothing is mapped in at load; each component is when it
// runs, and the UNet on a thread of its own while a text encoder runs (issue 15: start-up).
TEST(ModelFolder, ComponentsAreMappedInWhenTheyRunAndTheUNetBesideTheTextEncoder) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  c10::InferenceMode guard;
  const LoadOptions plain = unpacked();
  StableDiffusionModel m = load_model_folder(fixtures + "/models/tiny-sd1", plain);
  for (const auto& [name, weights] : m.mapped) EXPECT_FALSE(weights.resident()) << name << " mapped in at load";
  EXPECT_FALSE(m.prefetch.valid());

  m.use("text_encoder");
  EXPECT_TRUE(m.mapped.at("text_encoder").resident());
  ASSERT_TRUE(m.prefetch.valid()) << "the UNet is not being mapped in beside the text encoder";
  EXPECT_EQ(m.prefetching, "unet");
  m.use("text_encoder");  // encoding edits after prompts: the prefetch goes on
  EXPECT_TRUE(m.prefetch.valid());

  m.use("unet");
  EXPECT_FALSE(m.prefetch.valid());
  EXPECT_TRUE(m.prefetching.empty());
  EXPECT_TRUE(m.mapped.at("unet").resident());
  EXPECT_FALSE(m.mapped.at("text_encoder").resident());
  EXPECT_FALSE(m.mapped.at("vae").resident());

  m.use("vae");
  EXPECT_FALSE(m.prefetch.valid()) << "the VAE is mapped in when it runs, not beside the UNet";
  EXPECT_FALSE(m.mapped.at("unet").resident());
  // The next batch: the UNet, given back for the VAE, is mapped in again beside the encoder.
  m.use("text_encoder");
  ASSERT_TRUE(m.prefetch.valid());
  m.finish_prefetch();
  EXPECT_TRUE(m.mapped.at("unet").resident());
  EXPECT_TRUE(m.mapped.at("text_encoder").resident());
  EXPECT_FALSE(m.mapped.at("vae").resident());

  // Without page_out_idle: everything at load, no thread.
  LoadOptions resident = plain;
  resident.page_out_idle = false;
  StableDiffusionModel r = load_model_folder(fixtures + "/models/tiny-sd1", resident);
  for (const auto& [name, weights] : r.mapped) EXPECT_TRUE(weights.resident()) << name;
  r.use("text_encoder");
  EXPECT_FALSE(r.prefetch.valid());
}

// --fp16-weights: every linear and conv weight in float16, the arithmetic in float32. The
// UNet then gives exactly what a float32 UNet gives whose weights were rounded to float16
// (the conversion per call is exact), half the weight memory, and the file's pages dropped.
TEST(ModelFolder, Fp16WeightsAreFloat32ArithmeticOnFloat16RoundedWeights) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  c10::InferenceMode guard;
  const LoadOptions plain = unpacked();
  StableDiffusionModel half = load_model_folder(fixtures + "/models/tiny-sd1", plain);
  StableDiffusionModel rounded = load_model_folder(fixtures + "/models/tiny-sd1", plain);
  const size_t mapped_before = half.mapped.at("unet").bytes();
  const int64_t n = store_weights_fp16(half);
  EXPECT_GT(n, 20);
  EXPECT_LT(half.mapped.at("unet").bytes(), mapped_before / 10) << "the file's pages of converted weights are kept";
  int64_t linear = 0, conv = 0;
  for (const auto& child : half.unet->modules()) {
    if (auto* l = dynamic_cast<leaf::LinearImpl*>(child.get())) {
      EXPECT_EQ(l->weight().scalar_type(), at::kHalf);
      ++linear;
    }
    if (auto* c = dynamic_cast<leaf::Conv2dImpl*>(child.get())) {
      EXPECT_EQ(c->weight().scalar_type(), at::kHalf);
      ++conv;
    }
  }
  EXPECT_GT(linear, 0);
  EXPECT_GT(conv, 0);
  EXPECT_EQ(leaf::compute_dtype(*half.unet), at::kFloat);
  EXPECT_EQ(leaf::compute_dtype(*half.vae), at::kFloat);
  EXPECT_EQ(parameter_count(*half.unet), parameter_count(*rounded.unet));
  // The reference: float32 weights holding float16-rounded values.
  leaf::store_weights(*rounded.unet, at::kHalf, nullptr);
  leaf::store_weights(*rounded.unet, at::kFloat, nullptr);
  at::manual_seed(3);
  const at::Tensor x = at::randn({2, 4, 8, 8}), context = at::randn({2, 77, 32});
  const at::Tensor t = at::scalar_tensor(500.0);
  const at::Tensor got = half.unet->forward(x, t, context), want = rounded.unet->forward(x, t, context);
  EXPECT_EQ(got.scalar_type(), at::kFloat);
  EXPECT_TRUE(at::equal(got, want)) << "max |diff| " << (got - want).abs().max().item<double>();
  // And the rounding is the only change: close to the float32 UNet, not equal to it.
  StableDiffusionModel full = load_model_folder(fixtures + "/models/tiny-sd1", plain);
  const at::Tensor exact = full.unet->forward(x, t, context);
  const double off = (got - exact).abs().max().item<double>(), scale = exact.abs().max().item<double>();
  EXPECT_GT(off, 0.0);
  EXPECT_LT(off, 1e-2 * scale);
}

// The tiny SD 1.x folder loaded twice in `dtype`: plain, then with its convolutions prepacked.
std::pair<StableDiffusionModel, StableDiffusionModel> load_plain_and_prepacked(const std::string& fixtures,
                                                                               at::ScalarType dtype) {
  LoadOptions plain;
  plain.prepack_convolutions = false;
  plain.dtype = dtype;
  LoadOptions prepack = plain;
  prepack.prepack_convolutions = true;
  return {load_model_folder(fixtures + "/models/tiny-sd1", plain),
          load_model_folder(fixtures + "/models/tiny-sd1", prepack)};
}

std::vector<const leaf::Conv2dImpl*> unet_convolutions(const StableDiffusionModel& model) {
  std::vector<const leaf::Conv2dImpl*> convs;
  for (const auto& child : model.unet->modules())
    if (const auto* conv = dynamic_cast<const leaf::Conv2dImpl*>(child.get())) convs.push_back(conv);
  return convs;
}

// With prepack_convolutions every convolution is prepacked: the dense conv weights
// released (their pages of the file forgotten), the numbers those of at::conv2d to float rounding (on these tiny
// shapes at::conv2d does not always pick oneDNN; on SD's it does, and the bits agree; the
// golden parity runs the prepacked path).
TEST(ModelFolder, PrepackedConvolutionsGiveTheSameNumbers) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  c10::InferenceMode guard;
  auto [a, b] = load_plain_and_prepacked(fixtures, at::kFloat);
  const auto convs = unet_convolutions(b);
  EXPECT_GT(convs.size(), 10u);
  for (const leaf::Conv2dImpl* conv : convs) {
    EXPECT_TRUE(conv->prepacked());
    EXPECT_EQ(conv->weight().storage().nbytes(), sizeof(float)) << "dense weight kept";
  }
  EXPECT_LT(b.mapped.at("unet").bytes(), a.mapped.at("unet").bytes());
  EXPECT_EQ(parameter_count(*b.unet), parameter_count(*a.unet));  // names and shapes kept
  at::manual_seed(1);
  const at::Tensor x = at::randn({3, 4, 8, 8}), context = at::randn({3, 77, 32});
  const at::Tensor t = at::scalar_tensor(250.0);
  auto expect_close = [](const at::Tensor& got, const at::Tensor& want, const char* what) {
    const double err = (got - want).abs().max().item<double>(), top = want.abs().max().item<double>();
    EXPECT_LE(err, 1e-5 * top) << what << ": max |error| " << err << " of " << top;
  };
  expect_close(b.unet->forward(x, t, context), a.unet->forward(x, t, context), "unet");
  const at::Tensor z = at::randn({2, 4, 8, 8});
  expect_close(b.vae->decode(z), a.vae->decode(z), "vae decode");
  const at::Tensor image = at::rand({1, 3, 16, 16}) * 2 - 1;
  expect_close(b.vae->encode(image).mean, a.vae->encode(image).mean, "vae encode (stride-2 convolutions)");
}

// bf16 with prepacking loads on every CPU: the convolutions are reordered where oneDNN can
// (leaf::onednn_reorders) and keep their plain weights elsewhere, with a plain load's numbers.
TEST(ModelFolder, Bf16PrepackingLoadsOnEveryCpu) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  c10::InferenceMode guard;
  auto [a, b] = load_plain_and_prepacked(fixtures, at::kBFloat16);
  const auto convs = unet_convolutions(b);
  EXPECT_GT(convs.size(), 10u);
  for (const leaf::Conv2dImpl* conv : convs) EXPECT_EQ(conv->prepacked(), leaf::onednn_reorders(at::kBFloat16));
  at::manual_seed(1);
  const at::Tensor x = at::randn({2, 4, 8, 8}).to(at::kBFloat16);
  const at::Tensor context = at::randn({2, 77, 32}).to(at::kBFloat16);
  const at::Tensor t = at::scalar_tensor(250.0);
  const at::Tensor got = b.unet->forward(x, t, context);
  EXPECT_TRUE(got.isfinite().all().item<bool>());
  // Where nothing was reordered, the same kernels ran on the same weights.
  if (!leaf::onednn_reorders(at::kBFloat16)) EXPECT_TRUE(at::equal(got, a.unet->forward(x, t, context)));
}

TEST(ModelFolder, PickleWeightsAreRefused) {
  FAIRDIFF_REQUIRE_FIXTURES(fixtures);
  ModelCopy copy(fixtures);
  fs::remove(copy.path("vae/diffusion_pytorch_model.safetensors"));
  std::ofstream(copy.path("vae/diffusion_pytorch_model.bin")) << "pickle";
  test::expect_error([&] { load_vae(copy.path("vae"), {}); }, ErrorKind::Unsupported,
                     {"diffusion_pytorch_model.bin", "can execute code"});
}

}  // namespace
}  // namespace fairdiff
