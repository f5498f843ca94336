// fairdiff-train-toy-clip: trains the shipped CLIP (models/toy-clip), a small
// transformers CLIPModel that tells the toy world's colours (src/audit/toy_world.h) from
// text, so that `fairdiff audit --classifier clip --clip-model models/toy-clip` and
// `generate --verify` can be tried end to end without a download:
//
//   1. a byte-level BPE tokenizer in CLIP's format (vocab.json, merges.txt), learned here
//      from the words of the world's captions: the 256 byte symbols, the same with "</w>",
//      then one merge at a time, the most frequent pair first, until every caption word is
//      one token; then <|startoftext|> and <|endoftext|>, as CLIP lays its vocabulary out;
//   2. the CLIPModel from scratch on the symmetric contrastive (InfoNCE) loss with CLIP's
//      learned temperature (logit_scale, clamped at ln 100). A batch of 64 pictures holds
//      many of the same class and colour, so every caption that fits a picture counts as
//      its positive (the targets are spread over them) instead of being pushed away.
//
// The pictures are the world's renders (every class in every colour, uniformly) made to
// look like what the toy diffusion model draws: hue shifts (half of them within the
// colour's band, half anywhere: the toy model also draws purple and teal objects), changes
// of saturation and brightness, a colour cast, blur, noise. Every picture is labelled by
// the hue classifier, the audit's judge, after these changes: its colour, or none when
// the judge cannot tell. With --generated, pictures that models/toy generated are mixed in,
// labelled the same way; scripts/train-toy-clip generates them from seeds that no
// evaluation uses. Captions name the judged colour ("a photo of a red kite", "a red
// object", "red", the world's templates) or, for 15% of the renders and for every picture
// without a colour, only the class.
//
// Besides the contrastive loss, the zero-shot decision the audit makes is trained
// directly: the softmax over the colour prompts of configs/attributes/colour.json
// (ensembled as the classifier does) should name the judged colour, and be uniform where
// the judge sees none, so that a margin (audit --margin 0.5) leaves those unclassified.
//
// Deterministic for a given --seed, data and thread count.
#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/optim/adamw.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "clip_folder.h"
#include "clip_image_processor.h"
#include "clip_model.h"
#include "fairdiff/audit.h"
#include "fairdiff/error.h"
#include "fs_util.h"
#include "runtime.h"
#include "tensor_io.h"
#include "tokenizer.h"
#include "tool_main.h"
#include "toy_world.h"
#include "train_util.h"

namespace fs = std::filesystem;
using fairdiff::tools::cosine_lr;
using fairdiff::tools::seconds_since;
using fairdiff::tools::write_json;
using nlohmann::json;

namespace {

struct Options {
  std::string out_dir;
  std::vector<std::string> generated;  // --out folders of `fairdiff generate` on models/toy
  uint64_t seed = 0;
  int64_t steps = 3000, batch = 64;
  double lr = 1e-3;
  double generated_share = 0.3;  // of each batch, when --generated is given
  int threads = 1;
  int64_t log_every = 100;
  bool random_vit_l14 = false;  // write an untrained ViT-L/14-sized model instead (throughput checks)
};

constexpr int S = fairdiff::toy::kImageSize;
constexpr int64_t kTrainTextLength = 16;  // every caption fits; causal attention makes the EOS output independent of padding

// ---------------------------------------------------------------------------
// Captions.

// Templates that name the colour; the first three are the zero-shot prompts of
// configs/attributes/colour.json.
std::string colour_caption(const std::string& colour, const std::string& cls, fairdiff::toy::Rng& rng) {
  switch (rng.below(cls.empty() ? 3 : 5)) {
    case 0: return "a photo of a " + colour + " object";
    case 1: return "a " + colour + " object";
    case 2: return colour;
    case 3: return "a photo of a " + colour + " " + cls;
    default: return "a " + colour + " " + cls;
  }
}

// Every caption the trainer can write, for the tokenizer's word counts.
std::vector<std::string> caption_corpus(const fairdiff::toy::World& world) {
  std::vector<std::string> corpus;
  for (size_t c = 0; c < world.classes().size(); ++c)
    for (size_t k = 0; k < world.colours().size(); ++k)
      for (uint64_t r = 0; r < 64; ++r) {
        fairdiff::toy::Rng rng(r * 131 + c * 7 + k);
        corpus.push_back(world.caption(int(c), int(k), true, rng));
        corpus.push_back(world.caption(int(c), int(k), false, rng));
        corpus.push_back(colour_caption(world.colours()[k].name, world.classes()[c].name, rng));
      }
  return corpus;
}

std::vector<std::string> words_of(const std::string& text) {
  std::istringstream in(text);
  std::vector<std::string> words;
  for (std::string w; in >> w;) words.push_back(w);
  return words;
}

// What a caption says: the class and colour it names, -1 where it names none.
struct Meaning {
  int object_class = -1, colour = -1;
};
Meaning meaning_of(const fairdiff::toy::World& world, const std::string& caption) {
  Meaning m;
  for (const std::string& w : words_of(caption)) {
    if (world.class_index(w) >= 0) m.object_class = world.class_index(w);
    if (world.colour_index(w) >= 0) m.colour = world.colour_index(w);
  }
  return m;
}

// A caption fits a picture when everything it names is true of it (an unknown class,
// -1, is not contradicted).
bool fits(const Meaning& text, const Meaning& image) {
  const bool colour_ok = text.colour < 0 || text.colour == image.colour;
  const bool class_ok = text.object_class < 0 || image.object_class < 0 || text.object_class == image.object_class;
  return colour_ok && class_ok;
}

// ---------------------------------------------------------------------------
// The tokenizer: CLIP's byte-level BPE, learned on the caption words.

// CLIP's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68
// bytes for code points from 256 up. Returns the UTF-8 text of each byte's symbol, in
// the order CLIP's vocabulary lists them (printable bytes first).
std::vector<std::pair<int, std::string>> byte_symbols() {
  auto utf8 = [](int cp) {
    std::string s;
    if (cp < 0x80) {
      s += char(cp);
    } else {
      s += char(0xC0 | (cp >> 6));
      s += char(0x80 | (cp & 0x3F));
    }
    return s;
  };
  std::vector<std::pair<int, std::string>> out;
  std::vector<bool> printable(256, false);
  for (int b = 0; b < 256; ++b)
    if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) {
      printable[size_t(b)] = true;
      out.emplace_back(b, utf8(b));
    }
  int next = 256;
  for (int b = 0; b < 256; ++b)
    if (!printable[size_t(b)]) out.emplace_back(b, utf8(next++));
  return out;
}

struct LearnedBpe {
  json vocab = json::object();                          // token -> id
  std::vector<std::pair<std::string, std::string>> merges;  // in rank order
};

// The merges, most frequent pair first (ties: the smaller pair as strings, so the result
// does not depend on hash order), until every word is a single symbol.
LearnedBpe learn_bpe(const std::vector<std::string>& corpus) {
  std::map<std::string, int64_t> word_counts;
  for (const std::string& caption : corpus)
    for (const std::string& w : words_of(caption)) ++word_counts[w];
  std::vector<std::pair<std::vector<std::string>, int64_t>> words;  // symbols, count
  for (const auto& [w, n] : word_counts) {
    std::vector<std::string> symbols;
    for (char ch : w) symbols.emplace_back(1, ch);  // the captions are lower-case ASCII: each byte is its own symbol
    symbols.back() += "</w>";
    words.emplace_back(symbols, n);
  }
  LearnedBpe bpe;
  for (;;) {
    std::map<std::pair<std::string, std::string>, int64_t> pairs;
    for (const auto& [symbols, n] : words)
      for (size_t i = 0; i + 1 < symbols.size(); ++i) pairs[{symbols[i], symbols[i + 1]}] += n;
    if (pairs.empty()) break;
    auto best = pairs.begin();
    for (auto it = pairs.begin(); it != pairs.end(); ++it)
      if (it->second > best->second) best = it;
    const auto merge = best->first;
    bpe.merges.push_back(merge);
    for (auto& [symbols, n] : words) {
      std::vector<std::string> merged;
      for (size_t i = 0; i < symbols.size(); ++i) {
        if (i + 1 < symbols.size() && symbols[i] == merge.first && symbols[i + 1] == merge.second) {
          merged.push_back(merge.first + merge.second);
          ++i;
        } else {
          merged.push_back(symbols[i]);
        }
      }
      symbols = std::move(merged);
    }
  }
  int64_t id = 0;
  const auto bytes = byte_symbols();
  for (const auto& b : bytes) bpe.vocab[b.second] = id++;
  for (const auto& b : bytes) bpe.vocab[b.second + "</w>"] = id++;
  for (const auto& m : bpe.merges) bpe.vocab[m.first + m.second] = id++;
  bpe.vocab["<|startoftext|>"] = id++;
  bpe.vocab["<|endoftext|>"] = id++;
  return bpe;
}

void write_tokenizer(const LearnedBpe& bpe, const fs::path& dir) {
  // vocab.json in id order (nlohmann sorts object keys, so write it by hand).
  std::vector<std::string> by_id(bpe.vocab.size());
  for (const auto& [token, id] : bpe.vocab.items()) by_id[id.get<size_t>()] = token;
  std::string vocab = "{";
  for (size_t i = 0; i < by_id.size(); ++i) vocab += (i ? ", " : "") + json(by_id[i]).dump() + ": " + std::to_string(i);
  fairdiff::write_file_atomic((dir / "vocab.json").string(), vocab + "}\n");
  std::string merges = "#version: 0.2\n";
  for (const auto& m : bpe.merges) merges += m.first + " " + m.second + "\n";
  fairdiff::write_file_atomic((dir / "merges.txt").string(), merges);

  const int64_t bos = bpe.vocab["<|startoftext|>"], eos = bpe.vocab["<|endoftext|>"];
  auto special = [](const std::string& content) {
    return json{{"content", content}, {"lstrip", false}, {"normalized", true}, {"rstrip", false},
                {"single_word", false}, {"special", true}};
  };
  write_json(dir / "tokenizer_config.json",
             {{"tokenizer_class", "CLIPTokenizer"},
              {"model_max_length", 77},
              {"do_lower_case", true},
              {"errors", "replace"},
              {"clean_up_tokenization_spaces", true},
              {"bos_token", "<|startoftext|>"},
              {"eos_token", "<|endoftext|>"},
              {"unk_token", "<|endoftext|>"},
              {"pad_token", "<|endoftext|>"},
              {"added_tokens_decoder",
               {{std::to_string(bos), special("<|startoftext|>")}, {std::to_string(eos), special("<|endoftext|>")}}}});
  write_json(dir / "special_tokens_map.json", {{"bos_token", "<|startoftext|>"},
                                                {"eos_token", "<|endoftext|>"},
                                                {"unk_token", "<|endoftext|>"},
                                                {"pad_token", "<|endoftext|>"}});
}

// ---------------------------------------------------------------------------
// Configs: transformers CLIPModel / CLIPImageProcessor files, a small ViT on 32x32.

json clip_config(const fairdiff::Tokenizer& tok) {
  return {{"architectures", {"CLIPModel"}},
          {"model_type", "clip"},
          {"projection_dim", 32},
          {"logit_scale_init_value", 2.6592},
          {"initializer_factor", 1.0},
          {"torch_dtype", "float32"},
          {"text_config",
           {{"model_type", "clip_text_model"},
            {"vocab_size", tok.max_id() + 1},
            {"hidden_size", 64},
            {"intermediate_size", 256},
            {"num_hidden_layers", 2},
            {"num_attention_heads", 4},
            {"max_position_embeddings", 77},
            {"hidden_act", "quick_gelu"},
            {"layer_norm_eps", 1e-5},
            {"projection_dim", 32},
            {"bos_token_id", tok.bos_id()},
            {"eos_token_id", tok.eos_id()},
            {"pad_token_id", tok.pad_id()}}},
          {"vision_config",
           {{"model_type", "clip_vision_model"},
            {"hidden_size", 64},
            {"intermediate_size", 256},
            {"num_hidden_layers", 3},
            {"num_attention_heads", 4},
            {"num_channels", 3},
            {"image_size", S},
            {"patch_size", 4},
            {"hidden_act", "quick_gelu"},
            {"layer_norm_eps", 1e-5},
            {"projection_dim", 32}}}};
}

// The shapes of openai/clip-vit-large-patch14 (Stable Diffusion 1.x's text encoder and
// the usual CLIP judge of fairness studies), with this tokenizer's vocabulary: for
// timing the classifier at a real size without downloading it.
json vit_l14_config(const fairdiff::Tokenizer& tok) {
  json c = clip_config(tok);
  c["projection_dim"] = 768;
  c["text_config"].update({{"hidden_size", 768}, {"intermediate_size", 3072}, {"num_hidden_layers", 12},
                           {"num_attention_heads", 12}, {"projection_dim", 768}});
  c["vision_config"].update({{"hidden_size", 1024}, {"intermediate_size", 4096}, {"num_hidden_layers", 24},
                             {"num_attention_heads", 16}, {"image_size", 224}, {"patch_size", 14},
                             {"projection_dim", 768}});
  return c;
}

json preprocessor_config(int64_t size) {
  const fairdiff::CLIPImageProcessorConfig d;  // CLIP's mean and std
  return {{"image_processor_type", "CLIPImageProcessor"},
          {"do_resize", true},
          {"size", {{"shortest_edge", size}}},
          {"resample", 3},
          {"do_center_crop", true},
          {"crop_size", {{"height", size}, {"width", size}}},
          {"do_rescale", true},
          {"rescale_factor", 1.0 / 255.0},
          {"do_normalize", true},
          {"do_convert_rgb", true},
          {"image_mean", d.image_mean},
          {"image_std", d.image_std}};
}

// ---------------------------------------------------------------------------
// Pictures.

double gaussian(fairdiff::toy::Rng& rng) {  // Box-Muller on the world's own generator
  const double u = std::max(rng.uniform(), 1e-12), v = rng.uniform();
  return std::sqrt(-2.0 * std::log(u)) * std::cos(2.0 * M_PI * v);
}

uint8_t clamp_byte(double x) { return uint8_t(std::lround(std::clamp(x, 0.0, 255.0))); }

// What the toy diffusion model does to a picture: the hue moves (by at most
// max_hue_shift degrees), the saturation and brightness change, a light colour cast, blur,
// noise. The label comes from the hue classifier afterwards.
void augment(std::vector<uint8_t>& rgb, fairdiff::toy::Rng& rng, double max_hue_shift) {
  const double dh = rng.uniform(-max_hue_shift, max_hue_shift), ds = rng.uniform(0.55, 1.15), dv = rng.uniform(0.75, 1.15);
  for (size_t p = 0; p < rgb.size(); p += 3) {
    double h, s, v;
    fairdiff::toy::rgb_to_hsv(&rgb[p], &h, &s, &v);
    fairdiff::toy::hsv_to_rgb(h + dh, std::min(1.0, s * ds), std::min(1.0, v * dv), &rgb[p]);
  }
  if (rng.uniform() < 0.5) {
    const double cast[3] = {rng.uniform(-8.0, 8.0), rng.uniform(-8.0, 8.0), rng.uniform(-8.0, 8.0)};
    for (size_t p = 0; p < rgb.size(); ++p) rgb[p] = clamp_byte(rgb[p] + cast[p % 3]);
  }
  if (rng.uniform() < 0.5) {  // [1 2 1]/4 in both directions, mixed with the sharp picture
    const double a = rng.uniform(0.3, 1.0);
    std::vector<uint8_t> src = rgb;
    auto at = [&](int x, int y, int c) { return double(src[(size_t(std::clamp(y, 0, S - 1)) * S + std::clamp(x, 0, S - 1)) * 3 + c]); };
    for (int y = 0; y < S; ++y)
      for (int x = 0; x < S; ++x)
        for (int c = 0; c < 3; ++c) {
          double b = 0;
          for (int dy = -1; dy <= 1; ++dy)
            for (int dx = -1; dx <= 1; ++dx) b += (dx ? 1 : 2) * (dy ? 1 : 2) * at(x + dx, y + dy, c);
          rgb[(size_t(y) * S + x) * 3 + c] = clamp_byte((1 - a) * at(x, y, c) + a * b / 16.0);
        }
  }
  const double sigma = rng.uniform(0.0, 10.0);
  for (uint8_t& b : rgb) b = clamp_byte(b + sigma * gaussian(rng));
}

void flip_horizontally(std::vector<uint8_t>& rgb) {
  for (int y = 0; y < S; ++y)
    for (int x = 0; x < S / 2; ++x)
      for (int c = 0; c < 3; ++c)
        std::swap(rgb[(size_t(y) * S + x) * 3 + c], rgb[(size_t(y) * S + (S - 1 - x)) * 3 + c]);
}

struct Picture {
  std::vector<uint8_t> rgb;  // S x S x 3
  Meaning truth;             // class -1 for a generated picture (the prompt's class may not be drawn),
                             // colour -1 where the hue classifier sees none
};

// The PNGs of `fairdiff generate` output folders, in name order, with the hue
// classifier's group (-1: it cannot tell).
std::vector<Picture> load_generated(const std::vector<std::string>& dirs, const fairdiff::HueClassifier& hue) {
  std::vector<Picture> out;
  for (const std::string& dir : dirs) {
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(dir))
      if (e.is_regular_file() && e.path().extension() == ".png") files.push_back(e.path());
    std::sort(files.begin(), files.end());
    int64_t unclear = 0;
    for (const fs::path& f : files) {
      fairdiff::RgbImage image = fairdiff::read_png_rgb(f.string());
      if (image.width != S || image.height != S)
        fairdiff::throw_bad_input(f.string(), "is " + std::to_string(image.width) + "x" + std::to_string(image.height),
                                  "pass folders generated by models/toy (32x32)");
      const int group = hue.classify(image.rgb.data(), S, S);
      unclear += group < 0;
      out.push_back({std::move(image.rgb), Meaning{-1, group}});
    }
    std::printf("generated pictures: %zu from %s, %lld without a colour\n", files.size(), dir.c_str(), (long long)unclear);
  }
  return out;
}

struct Batch {
  at::Tensor pixel_values;  // [B,3,S,S] as CLIPImageProcessor makes them
  at::Tensor input_ids;     // [B,kTrainTextLength]
  at::Tensor fits;          // [B,B] float: caption j fits picture i
  at::Tensor colour;        // [B,G] float: the judged colour, one-hot, or uniform where there is none
};

at::Tensor pixel_values(const std::vector<std::vector<uint8_t>>& pictures, const fairdiff::CLIPImageProcessorConfig& p) {
  at::Tensor out = at::empty({int64_t(pictures.size()), 3, S, S});  // [B,3,S,S]
  for (size_t i = 0; i < pictures.size(); ++i) {
    const fairdiff::ClipPixels x = fairdiff::clip_preprocess(pictures[i].data(), S, S, p);
    std::memcpy(out[int64_t(i)].data_ptr<float>(), x.values.data(), x.values.size() * sizeof(float));
  }
  return out;
}

// Batch `step` depends on the seed and the step alone.
struct Data {
  const fairdiff::toy::World& world;
  const fairdiff::HueClassifier& judge;
  const std::vector<Picture>& generated;
  const fairdiff::Tokenizer& tok;
  const fairdiff::CLIPImageProcessorConfig& processor;
};

// A caption for a picture: its colour named (and its class where known), or its class alone.
std::string caption_for(const fairdiff::toy::World& world, const Meaning& truth, fairdiff::toy::Rng& rng) {
  const int c = truth.object_class, k = truth.colour;
  if (k < 0) return c < 0 ? "a picture" : world.caption(c, 0, false, rng);
  const double r = c < 0 ? 1.0 : rng.uniform();
  return r < 0.15  ? world.caption(c, k, false, rng)
         : r < 0.5 ? world.caption(c, k, true, rng)
                   : colour_caption(world.colours()[size_t(k)].name, c < 0 ? "" : world.classes()[size_t(c)].name, rng);
}

// A render of a random class and colour, changed as described at the top, labelled by the judge.
Picture judged_render(const Data& d, fairdiff::toy::Rng& rng) {
  const int c = rng.below(int(d.world.classes().size())), k = rng.below(int(d.world.colours().size()));
  fairdiff::toy::Sample s = d.world.render(c, k, rng);
  if (rng.uniform() < 0.85) augment(s.rgb, rng, rng.uniform() < 0.5 ? 18.0 : 60.0);
  const int judged = d.judge.classify(s.rgb.data(), S, S);
  return {std::move(s.rgb), Meaning{c, judged}};
}

Batch make_batch(const Options& o, int64_t step, const Data& d) {
  const fairdiff::toy::World& world = d.world;
  const std::vector<Picture>& generated = d.generated;
  fairdiff::toy::Rng rng(o.seed * 0x9E3779B97F4A7C15ULL + uint64_t(step) * 0xBF58476D1CE4E5B9ULL + 1);
  std::vector<std::vector<uint8_t>> pictures;
  std::vector<Meaning> truth, said;
  std::vector<int64_t> ids;
  for (int64_t i = 0; i < o.batch; ++i) {
    Picture p;
    if (!generated.empty() && rng.uniform() < o.generated_share) {
      p = generated[size_t(rng.below(int(generated.size())))];
      const double sigma = rng.uniform(0.0, 3.0);  // light: the judge's label must stay true
      for (uint8_t& b : p.rgb) b = clamp_byte(b + sigma * gaussian(rng));
      p.truth.colour = d.judge.classify(p.rgb.data(), S, S);
    } else {
      p = judged_render(d, rng);
    }
    if (rng.uniform() < 0.5) flip_horizontally(p.rgb);
    const std::string caption = caption_for(world, p.truth, rng);
    said.push_back(meaning_of(world, caption));
    truth.push_back(p.truth);
    pictures.push_back(std::move(p.rgb));
    const fairdiff::TokenizedText t = d.tok.tokenize(caption, kTrainTextLength);
    ids.insert(ids.end(), t.input_ids.begin(), t.input_ids.end());
  }
  Batch b;
  b.pixel_values = pixel_values(pictures, d.processor);
  b.input_ids = at::from_blob(ids.data(), {o.batch, kTrainTextLength}, at::kLong).clone();
  std::vector<float> fit;
  for (int64_t i = 0; i < o.batch; ++i)
    for (int64_t j = 0; j < o.batch; ++j) fit.push_back(fits(said[size_t(j)], truth[size_t(i)]) ? 1.0f : 0.0f);
  b.fits = at::from_blob(fit.data(), {o.batch, o.batch}, at::kFloat).clone();
  const auto G = int64_t(world.colours().size());
  std::vector<float> colour;
  for (const Meaning& m : truth)
    for (int64_t g = 0; g < G; ++g) colour.push_back(m.colour < 0 ? 1.0f / float(G) : float(m.colour == g));
  b.colour = at::from_blob(colour.data(), {o.batch, G}, at::kFloat).clone();
  return b;
}

// ---------------------------------------------------------------------------
// Training.

// Symmetric InfoNCE with several positives: each picture's target spreads evenly over the
// captions that fit it, each caption's over the pictures it fits.
at::Tensor contrastive_loss(const at::Tensor& logits, const at::Tensor& fits) {
  // logits, fits [B(pictures), B(captions)]
  const at::Tensor to_text = -(fits / fits.sum(1, true) * logits.log_softmax(1)).sum(1).mean();
  const at::Tensor to_image = -(fits / fits.sum(0, true) * logits.log_softmax(0)).sum(0).mean();
  return 0.5 * (to_text + to_image);
}

at::Tensor parameter(torch::nn::Module& module, const std::string& name) {
  const auto params = module.named_parameters();
  const at::Tensor* p = params.find(name);
  if (p == nullptr) fairdiff::throw_bad_input("CLIPModel", "has no parameter " + name);
  return *p;
}

// [G*3, kTrainTextLength]: the zero-shot prompts of configs/attributes/colour.json, three per colour.
at::Tensor colour_prompt_ids(const fairdiff::toy::World& world, const fairdiff::Tokenizer& tok) {
  std::vector<int64_t> ids;
  for (const auto& colour : world.colours())
    for (const std::string& p : {"a photo of a " + colour.name + " object", "a " + colour.name + " object", colour.name}) {
      const auto t = tok.tokenize(p, kTrainTextLength);
      ids.insert(ids.end(), t.input_ids.begin(), t.input_ids.end());
    }
  return at::from_blob(ids.data(), {int64_t(ids.size()) / kTrainTextLength, kTrainTextLength}, at::kLong).clone();
}

// [G,P]: each colour's prompt ensemble as the classifier forms it (the mean of the
// normalised prompt embeddings, normalised again).
at::Tensor colour_classes(fairdiff::CLIPModel& model, const at::Tensor& prompt_ids, int64_t groups) {
  const at::Tensor t = fairdiff::l2_normalize(model->get_text_features(prompt_ids));  // [G*3,P]
  return fairdiff::l2_normalize(t.view({groups, -1, t.size(1)}).mean(1));              // [G,P]
}

void train(const Options& o, fairdiff::CLIPModel& model, const Data& d) {
  at::Tensor logit_scale = parameter(*model, "logit_scale");
  const at::Tensor prompt_ids = colour_prompt_ids(d.world, d.tok);
  const auto G = int64_t(d.world.colours().size());
  torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(o.lr).weight_decay(0.01));
  const auto t0 = std::chrono::steady_clock::now();
  double running = 0, running_zs = 0;
  for (int64_t step = 0; step < o.steps; ++step) {
    fairdiff::tools::set_lr(opt, cosine_lr(o.lr, step, o.steps, 100));
    const Batch b = make_batch(o, step, d);
    const at::Tensor image = fairdiff::l2_normalize(model->get_image_features(b.pixel_values));  // [B,P]
    const at::Tensor text = fairdiff::l2_normalize(model->get_text_features(b.input_ids));       // [B,P]
    const at::Tensor scale = logit_scale.exp();
    const at::Tensor loss = contrastive_loss(scale * image.mm(text.t()), b.fits);  // logits [B,B]
    // The audit's decision: softmax over the colour ensembles against the judged colour.
    const at::Tensor zs_logits = scale * image.mm(colour_classes(model, prompt_ids, G).t());  // [B,G]
    const at::Tensor zs_loss = -(b.colour * zs_logits.log_softmax(1)).sum(1).mean();
    opt.zero_grad();
    (loss + zs_loss).backward();
    opt.step();
    {
      at::NoGradGuard no_grad;
      logit_scale.clamp_(0.0, std::log(100.0));  // CLIP's cap on the temperature
    }
    running = step == 0 ? loss.item<double>() : 0.98 * running + 0.02 * loss.item<double>();
    running_zs = step == 0 ? zs_loss.item<double>() : 0.98 * running_zs + 0.02 * zs_loss.item<double>();
    if (step % o.log_every == 0 || step + 1 == o.steps)
      std::printf("step %5lld/%lld  contrastive %.4f  zero-shot %.4f  logit scale %.1f  %.1f s\n", (long long)step,
                  (long long)o.steps, running, running_zs, std::exp(logit_scale.item<double>()), seconds_since(t0));
    std::fflush(stdout);
  }
  model->eval();
}

// Agreement with the judge of the zero-shot decision at margin 0.5 on fresh judged renders
// and on the generated pictures: a check printed at the end, not a gate
// (fairdiff-clip-agreement measures the audit itself).
void report_agreement(fairdiff::CLIPModel& model, const Data& d, uint64_t seed) {
  at::NoGradGuard no_grad;
  const auto G = int64_t(d.world.colours().size());
  const at::Tensor classes = colour_classes(model, colour_prompt_ids(d.world, d.tok), G);
  const double scale = model->logit_scale_exp();
  auto agreement = [&](const std::vector<Picture>& pictures) {
    std::vector<std::vector<uint8_t>> rgb;
    for (const Picture& p : pictures) rgb.push_back(p.rgb);
    const at::Tensor image = fairdiff::l2_normalize(model->get_image_features(pixel_values(rgb, d.processor)));
    const auto [best, group] = (scale * image.mm(classes.t())).softmax(1).max(1);
    int64_t same = 0;
    for (size_t i = 0; i < pictures.size(); ++i) {
      const int64_t clip = best[int64_t(i)].item<double>() < 0.5 ? -1 : group[int64_t(i)].item<int64_t>();
      same += clip == pictures[i].truth.colour;
    }
    return 100.0 * double(same) / double(std::max<size_t>(1, pictures.size()));
  };
  fairdiff::toy::Rng rng(seed ^ 0xE7A1ULL);
  std::vector<Picture> renders;
  for (int i = 0; i < 1000; ++i) renders.push_back(judged_render(d, rng));
  std::printf("agreement with the hue classifier (margin 0.5): changed renders %.1f%%", agreement(renders));
  if (!d.generated.empty()) std::printf(", generated (training) %.1f%%", agreement(d.generated));
  std::printf("\n");
}

int run(const Options& o) {
  fairdiff::configure_threads(o.threads);
  fairdiff::configure_allocator();
  const auto t0 = std::chrono::steady_clock::now();
  const fairdiff::toy::World world;
  const fairdiff::HueClassifier judge;
  const std::vector<Picture> generated = load_generated(o.generated, judge);
  const LearnedBpe bpe = learn_bpe(caption_corpus(world));

  fairdiff::tools::publish_folder(o.out_dir, [&](const fs::path& dir) {
    fs::create_directories(dir);
    write_tokenizer(bpe, dir);
    const auto tok = fairdiff::load_clip_tokenizer(dir.string());
    std::printf("tokenizer: %zu merges, %lld ids\n", bpe.merges.size(), (long long)tok->max_id() + 1);
    const json config = o.random_vit_l14 ? vit_l14_config(*tok) : clip_config(*tok);
    const json processor_json = preprocessor_config(config["vision_config"]["image_size"].get<int64_t>());
    const fairdiff::CLIPImageProcessorConfig processor =
        fairdiff::CLIPImageProcessorConfig::from_json(processor_json, "preprocessor config");
    at::manual_seed(o.seed);  // the initial weights
    fairdiff::CLIPModel model(fairdiff::CLIPConfig::from_json(config, "clip config"));
    fairdiff::tools::init_for_training(*model);
    {
      at::NoGradGuard no_grad;
      parameter(*model, "logit_scale").fill_(config["logit_scale_init_value"].get<double>());
    }
    write_json(dir / "config.json", config);
    write_json(dir / "preprocessor_config.json", processor_json);
    if (o.random_vit_l14) {
      fairdiff::save_state_dict(*model, (dir / "model.safetensors").string());
      return;
    }
    const Data data{world, judge, generated, *tok, processor};
    train(o, model, data);
    report_agreement(model, data, o.seed);
    fairdiff::save_state_dict(*model, (dir / "model.safetensors").string());
    // Load it back as the audit will: strict names and shapes, the tokenizer's ids.
    fairdiff::load_clip_folder(dir.string(), {});
  });
  std::printf("wrote %s in %.0f s\n", o.out_dir.c_str(), seconds_since(t0));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"fairdiff-train-toy-clip: train the shipped toy CLIP (see scripts/train-toy-clip)"};
  Options o;
  app.add_option("--out", o.out_dir, "model folder to write (replaced when the run finishes)")->required();
  app.add_option("--generated", o.generated, "folders of pictures generated by models/toy (repeatable)")
      ->check(CLI::ExistingDirectory);
  app.add_option("--seed", o.seed, "seed of the data stream and the initial weights")->capture_default_str();
  app.add_option("--steps", o.steps, "training steps")->capture_default_str();
  app.add_option("--batch", o.batch, "picture-caption pairs per step")->capture_default_str();
  app.add_option("--lr", o.lr, "peak learning rate")->capture_default_str();
  app.add_option("--generated-share", o.generated_share, "share of generated pictures in a batch")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  app.add_option("--log-every", o.log_every, "steps between progress lines")->capture_default_str();
  app.add_option("--threads", o.threads, "CPU threads (0 = all CPUs)")->capture_default_str();
  app.add_flag("--random-vit-l14", o.random_vit_l14,
               "write an untrained model of openai/clip-vit-large-patch14's shapes instead (for timing)");
  return fairdiff::tools::run_tool("fairdiff-train-toy-clip", app, argc, argv, [&] { return run(o); });
}
