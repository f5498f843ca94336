// Parity ops for CLIPModel and CLIPImageProcessor (group clip/): image and text
// embeddings, zero-shot logits, and the bit-exact preprocessing.
#include <map>

#include "clip_folder.h"
#include "parity.h"

namespace fairdiff::parity {
namespace {

CLIPFolder& clip_for(const ParityCase& c) {
  static std::map<std::string, CLIPFolder> cache;
  const std::string dir = c.model_dir();
  auto it = cache.find(dir);
  if (it == cache.end()) it = cache.emplace(dir, load_clip_folder(dir, {c.options().dtype, c.options().device})).first;
  return it->second;
}

// Our tokenizer's ids and mask for params.prompts (or params.labels), checked bit-exactly
// against the recorded ones where the case has them.
std::pair<at::Tensor, at::Tensor> tokenize(ParityCase& c, const CLIPFolder& clip, const std::string& key) {
  std::vector<int64_t> ids, mask;
  int64_t n = 0;
  for (const auto& text : c.params().at(key)) {
    const TokenizedText t = clip.tokenizer->tokenize(text.get<std::string>());
    ids.insert(ids.end(), t.input_ids.begin(), t.input_ids.end());
    mask.insert(mask.end(), t.attention_mask.begin(), t.attention_mask.end());
    ++n;
  }
  at::Tensor ids_t = at::tensor(ids, at::kLong).view({n, -1}), mask_t = at::tensor(mask, at::kLong).view({n, -1});
  if (c.has_output("input_ids")) c.check("input_ids", ids_t);
  if (c.has_output("attention_mask")) c.check("attention_mask", mask_t);
  // The recorded inputs must be what our tokenizer gives, else the comparison below is moot.
  if (c.has_input("input_ids") && !at::equal(c.input("input_ids"), ids_t)) c.fail("input_ids", "tokenizer differs");
  return {ids_t, mask_t};
}

// Image i of the case's "images" input list: [H, W, 3] uint8.
at::Tensor uint8_image(const ParityCase& c, size_t i) {
  return c.tensor(c.spec().at("inputs").at("images").at(i).get<std::string>()).to(at::kByte).contiguous();
}

ClipPixels preprocess(const CLIPFolder& clip, const at::Tensor& hwc) {
  return clip_preprocess(hwc.data_ptr<uint8_t>(), hwc.size(1), hwc.size(0), clip.processor);
}

at::Tensor as_tensor(const Rgb8& image) {
  return at::tensor(std::vector<uint8_t>(image.rgb.begin(), image.rgb.end()), at::kByte)
      .view({image.height, image.width, 3});
}

at::Tensor pixel_values(const ClipPixels& p) {
  return at::tensor(p.values, at::kFloat).view({1, 3, p.height, p.width});
}

void clip_image_embeds(ParityCase& c) {
  CLIPFolder& clip = clip_for(c);
  const at::Tensor pixels = c.input("pixel_values").to(c.options().device, c.options().dtype);
  const CLIPVisionOutput v = clip.model->vision_forward(pixels);
  c.check("vision_last_hidden_state", v.last_hidden_state);
  c.check("vision_pooled", v.pooler_output);
  const at::Tensor embeds = clip.model->get_image_features(pixels);
  c.check("image_embeds", embeds);
  c.check("image_embeds_normalized", l2_normalize(embeds));
}

void clip_text_embeds(ParityCase& c) {
  CLIPFolder& clip = clip_for(c);
  auto [ids, mask] = tokenize(c, clip, "prompts");
  ids = ids.to(c.options().device);
  mask = mask.to(c.options().device);
  const CLIPTextOutput t = clip.model->text_forward(ids, mask);
  c.check("text_last_hidden_state", t.last_hidden_state);
  c.check("text_pooled", t.pooler_output);
  const at::Tensor embeds = clip.model->get_text_features(ids, mask);
  c.check("text_embeds", embeds);
  c.check("text_embeds_normalized", l2_normalize(embeds));
}

void clip_preprocess_case(ParityCase& c) {
  CLIPFolder& clip = clip_for(c);
  std::vector<at::Tensor> values, cropped;
  const auto& images = c.spec().at("inputs").at("images");
  for (size_t i = 0; i < images.size(); ++i) {
    const ClipPixels p = preprocess(clip, uint8_image(c, i));
    c.check("resized_uint8_" + std::to_string(i), as_tensor(p.resized));
    cropped.push_back(as_tensor(p.cropped));
    values.push_back(pixel_values(p));
  }
  c.check("cropped_uint8", at::stack(cropped));
  c.check("pixel_values", at::cat(values));
}

void clip_zero_shot(ParityCase& c) {
  CLIPFolder& clip = clip_for(c);
  at::Tensor pixels = c.input("pixel_values");
  if (c.spec().at("inputs").contains("images")) {
    // From the raw images: our preprocessing feeds the model (and must equal the recorded input).
    std::vector<at::Tensor> values;
    for (size_t i = 0; i < c.spec().at("inputs").at("images").size(); ++i)
      values.push_back(pixel_values(preprocess(clip, uint8_image(c, i))));
    const at::Tensor ours = at::cat(values);
    const double diff = (ours - pixels).abs().max().item<double>();
    c.note("pixel_values from our preprocessing: max |diff| " + std::to_string(diff));
    if (diff > 3e-5) c.fail("pixel_values", "our preprocessing differs from the recorded pixel_values");
    pixels = ours;
  }
  auto [ids, mask] = tokenize(c, clip, "labels");
  const at::Device device = c.options().device;
  const at::Tensor image = l2_normalize(clip.model->get_image_features(pixels.to(device, c.options().dtype)));
  const at::Tensor text = l2_normalize(clip.model->get_text_features(ids.to(device), mask.to(device)));
  const at::Tensor logits = clip.model->logit_scale_exp() * at::matmul(image, text.t());  // [N_img, N_labels]
  c.check("image_embeds_normalized", image);
  c.check("text_embeds_normalized", text);
  c.check("logits_per_image", logits);
  c.check("logits_per_text", logits.t());
  c.check("probs", at::softmax(logits, 1));
}

}  // namespace

void register_clip_ops(OpRegistry& registry) {
  registry["clip_image_embeds"] = clip_image_embeds;
  registry["clip_text_embeds"] = clip_text_embeds;
  registry["clip_preprocess"] = clip_preprocess_case;
  registry["clip_zero_shot"] = clip_zero_shot;
}

}  // namespace fairdiff::parity
