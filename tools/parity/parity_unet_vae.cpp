// Parity ops for the UNet and the VAE: unet_forward, vae_decode, vae_encode.
// Models are loaded once per (folder, dtype, device) through the library's own loaders,
// so these cases also cover config parsing and strict weight loading.
#include <c10/core/InferenceMode.h>

#include <map>
#include <string>

#include "model_folder.h"
#include "parity.h"

namespace fairdiff::parity {

void register_unet_vae_ops(OpRegistry& registry);

namespace {

// The `component` (unet, vae) of the case's model folder in its dtype and on its device,
// loaded once (and prepacked when asked) per folder, dtype and device.
template <class Model>
Model& cached(const ParityCase& c, const std::string& component,
              Model (*load)(const std::string&, const LoadOptions&, MappedWeights*, std::vector<PendingWeights>*)) {
  static std::map<std::string, Model> cache;
  const std::string dir = c.model_dir() + "/" + component;
  const std::string key = dir + "|" + c10::toString(c.options().dtype) + "|" + c.options().device.str();
  auto it = cache.find(key);
  if (it == cache.end()) {
    it = cache.emplace(key, load(dir, {c.options().dtype, c.options().device}, nullptr, nullptr)).first;
    if (c.options().prepack) leaf::prepack_convolutions(*it->second, nullptr);
  }
  return it->second;
}

UNet2DConditionModel& unet_for(const ParityCase& c) { return cached<UNet2DConditionModel>(c, "unet", load_unet); }

AutoencoderKL& vae_for(const ParityCase& c) { return cached<AutoencoderKL>(c, "vae", load_vae); }

// An input in the model's dtype and device.
at::Tensor model_input(const ParityCase& c, const std::string& name) {
  return c.input(name).to(c.options().device, c.options().dtype);
}

void unet_forward(ParityCase& c) {
  c10::InferenceMode inference;
  UNet2DConditionModel& unet = unet_for(c);
  const at::Tensor sample = model_input(c, "sample");
  const at::Tensor context = model_input(c, "encoder_hidden_states");
  c.check("sample", unet->forward(sample, case_timestep(c), context));
}

void vae_decode(ParityCase& c) {
  c10::InferenceMode inference;
  AutoencoderKL& vae = vae_for(c);
  const double scaling_factor = vae->config().scaling_factor;
  if (c.params().contains("scaling_factor") && c.params().at("scaling_factor").get<double>() != scaling_factor)
    c.note("params.scaling_factor differs from vae/config.json; using the config's");
  const at::Tensor latents = model_input(c, "latents");
  const at::Tensor decoded = vae->decode(latents / scaling_factor);  // [B,3,H,W]
  c.check("decoded", decoded);
  if (c.has_output("image")) c.check("image", (decoded / 2 + 0.5).clamp(0, 1));
}

void vae_encode(ParityCase& c) {
  c10::InferenceMode inference;
  AutoencoderKL& vae = vae_for(c);
  const LatentDistribution d = vae->encode(model_input(c, "image"));
  for (const std::string& name : c.output_names()) {
    if (name == "mean")
      c.check(name, d.mean);
    else if (name == "logvar")
      c.check(name, d.logvar);
    else if (name == "std")
      c.check(name, d.std);
    else if (name == "moments")
      c.check(name, d.moments);
    else
      c.fail(name, "vae_encode has no output named " + name);
  }
}

}  // namespace

at::Tensor case_timestep(const ParityCase& c) {
  // Per-sample timesteps come as in.timestep [B] (int64); a scalar comes in params, and
  // keeps its Python type as the reference's UNet sees it (int -> int64, float -> float64).
  if (c.has_input("timestep")) return c.input("timestep");
  const nlohmann::json& t = c.params().at("timestep");
  return t.is_number_integer() ? at::scalar_tensor(t.get<int64_t>(), at::kLong)
                               : at::scalar_tensor(t.get<double>(), at::kDouble);
}

void register_unet_vae_ops(OpRegistry& registry) {
  registry["unet_forward"] = unet_forward;
  registry["vae_decode"] = vae_decode;
  registry["vae_encode"] = vae_encode;
}

}  // namespace fairdiff::parity
