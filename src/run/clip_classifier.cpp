// The CLIP zero-shot classifier ("clip" in the audit's registry): an image goes to the group
// whose class texts it is most similar to, as CLIPModel's logits_per_image and softmax give
// it, or to none when the best probability is below the margin. Class texts come from the
// attribute file's "classifier_prompts"; several per group are averaged (a prompt
// ensemble: the mean of the normalised text embeddings, normalised again, as CLIP's
// zero-shot evaluation does).
#include <c10/core/InferenceMode.h>

#include "clip_folder.h"
#include "fairdiff/audit.h"
#include "fairdiff/error.h"
#include "fairdiff/model.h"
#include "fairness.h"

namespace fairdiff {
namespace {

class ClipClassifier : public GroupClassifier {
 public:
  ClipClassifier(const ClassifierOptions& o, const Attribute& attribute)
      : attribute_(attribute.name), margin_(o.margin) {
    c10::InferenceMode inference;
    LoadOptions load;  // float32, no weights cache: nothing converts
    load.device = at::Device(o.device);
    clip_ = load_clip_folder(o.model, load);
    device_ = load.device;
    std::vector<at::Tensor> classes;
    for (const AttributeGroup& g : attribute.groups) {
      groups_.push_back(g.name);
      classes.push_back(l2_normalize(text_features(g.classifier_prompts).mean(0)));
    }
    classes_ = at::stack(classes);  // [G, P]
    logit_scale_ = clip_.model->logit_scale_exp();
  }

  std::string name() const override { return "clip"; }
  std::string attribute() const override { return attribute_; }
  const std::vector<std::string>& groups() const override { return groups_; }

  int classify(const uint8_t* rgb, int width, int height) const override {
    return decide(probabilities(rgb, width, height));
  }

  std::vector<int> classify_batch(const std::vector<const RgbImage*>& images) const override {
    std::vector<int> out;
    for (const auto& p : probs(images)) out.push_back(decide(p));
    return out;
  }

  Judgement judge(const uint8_t* rgb, int width, int height) const override {
    std::vector<double> p = probabilities(rgb, width, height);
    const int group = decide(p);
    return {group, std::move(p)};
  }

  std::vector<double> probabilities(const uint8_t* rgb, int width, int height) const override {
    const RgbImage image{width, height, std::vector<uint8_t>(rgb, rgb + int64_t(width) * height * 3)};
    return probs({&image})[0];
  }

 private:
  // [T, P]: normalised text embeddings of the prompts.
  at::Tensor text_features(const std::vector<std::string>& prompts) {
    std::vector<int64_t> ids, mask;
    for (const std::string& p : prompts) {
      const TokenizedText t = clip_.tokenizer->tokenize(p);
      ids.insert(ids.end(), t.input_ids.begin(), t.input_ids.end());
      mask.insert(mask.end(), t.attention_mask.begin(), t.attention_mask.end());
    }
    const auto T = static_cast<int64_t>(prompts.size());
    const at::Tensor ids_t = at::tensor(ids, at::kLong).view({T, -1}).to(device_);
    const at::Tensor mask_t = at::tensor(mask, at::kLong).view({T, -1}).to(device_);
    return l2_normalize(clip_.model->get_text_features(ids_t, mask_t));
  }

  // Softmax over the groups of exp(logit_scale) * cos(image, class), per image.
  std::vector<std::vector<double>> probs(const std::vector<const RgbImage*>& images) const {
    c10::InferenceMode inference;
    const size_t n = images.size();
    std::vector<at::Tensor> pixels;
    for (const RgbImage* image : images) {
      const ClipPixels p = clip_preprocess(image->rgb.data(), image->width, image->height, clip_.processor);
      pixels.push_back(at::tensor(p.values, at::kFloat).view({3, p.height, p.width}));
    }
    const at::Tensor image = l2_normalize(clip_.model->get_image_features(at::stack(pixels).to(device_)));  // [B, P]
    const at::Tensor p = at::softmax(logit_scale_ * at::matmul(image, classes_.t()), 1).to(at::kCPU, at::kDouble);
    std::vector<std::vector<double>> out(n);
    for (size_t i = 0; i < n; ++i) {
      const double* row = p[static_cast<int64_t>(i)].data_ptr<double>();
      out[i].assign(row, row + groups_.size());
    }
    return out;
  }

  int decide(const std::vector<double>& p) const {
    const auto best = std::max_element(p.begin(), p.end());
    return *best < margin_ ? -1 : static_cast<int>(best - p.begin());
  }

  std::string attribute_;
  double margin_;
  mutable CLIPFolder clip_;  // forward() is not const in LibTorch; the weights never change
  at::Device device_ = at::kCPU;
  std::vector<std::string> groups_;
  at::Tensor classes_;  // [G, P], normalised
  double logit_scale_ = 1;
};

}  // namespace

void register_clip_classifier() {
  register_classifier(
      {"clip", "any attribute whose file has classifier_prompts (gender, colour), with --clip-model DIR",
       [](const ClassifierOptions& o) -> std::unique_ptr<GroupClassifier> {
         const Attribute attribute = load_attribute(o.attribute, o.attributes_dir);
         if (attribute.groups.front().classifier_prompts.empty())
           throw_bad_input("--classifier clip", "attribute \"" + o.attribute + "\" has no classifier_prompts",
                           "add \"classifier_prompts\": {\"GROUP\": [\"a photo of ...\"], ...} to " +
                               attributes_dir(o.attributes_dir) + "/" + o.attribute + ".json");
         if (o.model.empty())
           throw_bad_input("--classifier clip", "needs a CLIP model",
                           "give --clip-model DIR (a transformers CLIPModel folder, e.g. models/toy-clip)");
         if (!(o.margin >= 0 && o.margin <= 1))
           throw_bad_input("--margin " + std::to_string(o.margin), "is not a probability", "give a value in [0, 1]");
         return std::make_unique<ClipClassifier>(o, attribute);
       }});
}

}  // namespace fairdiff
