// Semantic guidance (SEGA). Shape letters: B images, C latent channels, h/w latent
// size, E edit rows evaluated at a step, K concept embeddings, L tokens, D hidden size.
#include "semantic_guidance.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "fairdiff/error.h"

namespace fairdiff {
namespace {

std::string concept_name(size_t image, size_t edit) {
  return "image " + std::to_string(image) + " concept " + std::to_string(edit);
}

// The loop index from which every concept of the image is warm (cooled-down ones count as warm).
int64_t all_warm_from(const std::vector<EditConcept>& concepts) {
  int64_t from = 0;
  for (const auto& c : concepts) from = std::max(from, c.warmup_steps);
  return from;
}

// The momentum feeds the output only through the all-warm branch, scaled by s_m.
bool momentum_reaches_output(const SemanticGuidanceSettings& s, int64_t image, int64_t num_steps) {
  if (s.momentum_scale == 0.0) return false;
  return num_steps <= 0 || all_warm_from(s.images[static_cast<size_t>(image)]) < num_steps;
}

// The reference's threshold: keep d where |d| >= the lambda-quantile of |d| over the h*w
// positions of each (image, channel), torch.quantile's linear interpolation, in float32.
at::Tensor keep_above_quantile(const at::Tensor& d, double threshold) {
  // d: [1, C, h, w]
  const at::Tensor magnitude = d.abs();
  at::Tensor q;
  if (d.scalar_type() == at::kFloat) {
    q = at::quantile(magnitude.flatten(2), threshold, /*dim=*/2, /*keepdim=*/false, "linear");  // [1, C]
  } else {
    q = at::quantile(magnitude.flatten(2).to(at::kFloat), threshold, 2, false, "linear").to(d.scalar_type());
  }
  return at::where(magnitude >= q.unsqueeze(-1).unsqueeze(-1), d, at::zeros_like(d));  // [1, C, h, w]
}

}  // namespace

void validate(const SemanticGuidanceSettings& s, int64_t num_embeddings, const std::string& where) {
  if (!std::isfinite(s.momentum_scale) || !std::isfinite(s.momentum_beta))
    throw_bad_input(where, "momentum scale and beta must be finite numbers");
  for (size_t b = 0; b < s.images.size(); ++b) {
    for (size_t c = 0; c < s.images[b].size(); ++c) {
      const EditConcept& e = s.images[b][c];
      const std::string at = where + ", " + concept_name(b, c);
      if (e.embedding < 0 || e.embedding >= num_embeddings)
        throw_bad_input(at, "embedding row " + std::to_string(e.embedding) + " is outside the table of " +
                                std::to_string(num_embeddings) + " concept embeddings");
      if (!(e.threshold >= 0.0 && e.threshold <= 1.0))
        throw_bad_input(at, "threshold " + std::to_string(e.threshold) + " is not a quantile in [0, 1]",
                        "0.95 keeps the top 5% of the latent positions");
      if (!std::isfinite(e.guidance_scale)) throw_bad_input(at, "edit guidance scale must be a finite number");
      if (!std::isfinite(e.weight)) throw_bad_input(at, "edit weight must be a finite number");
      if (e.warmup_steps < 0 || e.cooldown_steps < 0)
        throw_bad_input(at, "warm-up and cool-down must be >= 0 steps");
    }
  }
}

std::vector<EditConcept> steer_toward(int64_t target_group, int64_t groups, const EditConcept& settings) {
  if (groups < 1 || target_group < 0 || target_group >= groups)
    throw_bad_input("steer_toward", "target group " + std::to_string(target_group) + " is not one of the " +
                                        std::to_string(groups) + " groups");
  std::vector<EditConcept> concepts;
  for (int64_t k = 0; k < groups; ++k) {
    EditConcept e = settings;
    e.embedding = k;
    e.reverse = k != target_group;
    concepts.push_back(e);
  }
  return concepts;
}

bool edit_needed(const SemanticGuidanceSettings& s, int64_t image, size_t edit, int64_t step, int64_t num_steps) {
  const EditConcept& e = s.images.at(static_cast<size_t>(image)).at(edit);
  if (step >= e.cooldown_steps) return false;                 // zeroed by the cool-down
  if (!(e.weight > 0.0) || e.guidance_scale == 0.0) return false;  // weight clamped to 0 / guidance 0
  if (step >= e.warmup_steps) return true;
  return momentum_reaches_output(s, image, num_steps);        // before warm-up it only feeds the momentum
}

std::vector<EditRow> edit_rows(const SemanticGuidanceSettings& s, int64_t step, int64_t num_steps, bool all) {
  std::vector<EditRow> rows;
  for (size_t b = 0; b < s.images.size(); ++b) {
    const size_t first = rows.size();
    for (size_t c = 0; c < s.images[b].size(); ++c) {
      if (!all && !edit_needed(s, static_cast<int64_t>(b), c, step, num_steps)) continue;
      const EditRow row{static_cast<int64_t>(b), s.images[b][c].embedding};
      if (std::find(rows.begin() + static_cast<std::ptrdiff_t>(first), rows.end(), row) == rows.end())
        rows.push_back(row);
    }
  }
  return rows;
}

SemanticStep semantic_guidance_step(const SemanticGuidanceSettings& s, int64_t step, int64_t num_steps,
                                    const at::Tensor& eps_uncond, const at::Tensor& eps_edit,
                                    const std::vector<EditRow>& rows, const at::Tensor& momentum) {
  // eps_uncond: [B, C, h, w]; eps_edit: [E, C, h, w]; momentum: [B, C, h, w] or undefined
  const int64_t B = eps_uncond.size(0);
  TORCH_CHECK(static_cast<int64_t>(s.images.size()) == B, "semantic guidance: settings for ", s.images.size(),
              " images, estimates for ", B);
  TORCH_CHECK(rows.empty() || (eps_edit.defined() && eps_edit.size(0) == static_cast<int64_t>(rows.size())),
              "semantic guidance: ", rows.size(), " edit rows named, ",
              eps_edit.defined() ? eps_edit.size(0) : 0, " estimates given");
  const double s_m = s.momentum_scale, beta = s.momentum_beta;

  SemanticStep out;
  out.applied.assign(static_cast<size_t>(B), false);
  std::vector<at::Tensor> guidance, next_momentum;
  for (int64_t b = 0; b < B; ++b) {
    const auto& concepts = s.images[static_cast<size_t>(b)];
    const at::Tensor u = eps_uncond.narrow(0, b, 1);                                   // [1, C, h, w]
    const at::Tensor m = momentum.defined() ? momentum.narrow(0, b, 1) : at::zeros_like(u);  // [1, C, h, w]
    const int64_t n = static_cast<int64_t>(concepts.size());
    if (n == 0) {  // the reference without edit concepts: no term, no momentum update
      guidance.push_back(at::zeros_like(u));
      next_momentum.push_back(m);
      continue;
    }
    std::vector<at::Tensor> G;      // per concept [1, C, h, w]
    std::vector<double> W;          // per concept weight (0 where cooled down)
    std::vector<int64_t> warm;      // concepts past their warm-up
    for (size_t c = 0; c < concepts.size(); ++c) {
      const EditConcept& e = concepts[c];
      if (step >= e.warmup_steps) warm.push_back(static_cast<int64_t>(c));
      if (step >= e.cooldown_steps) {
        G.push_back(at::zeros_like(u));
        W.push_back(0.0);
        continue;
      }
      W.push_back(e.weight);
      const auto it = std::find(rows.begin(), rows.end(), EditRow{b, e.embedding});
      if (it == rows.end()) {
        TORCH_CHECK(!edit_needed(s, b, c, step, num_steps), "semantic guidance: step ", step, ": no estimate for ",
                    concept_name(static_cast<size_t>(b), c), ", which can change the result");
        G.push_back(at::zeros_like(u));
        continue;
      }
      // The direction is relative to the UNCONDITIONAL estimate; sign, then scale, then threshold.
      at::Tensor d = eps_edit.narrow(0, it - rows.begin(), 1) - u;  // [1, C, h, w]
      if (e.reverse) d = d * -1;
      d = d * e.guidance_scale;
      G.push_back(keep_above_quantile(d, e.threshold));
    }
    const at::Tensor Gs = at::stack(G);  // [n, 1, C, h, w]
    const at::Tensor Wt =
        at::tensor(W, at::TensorOptions(at::kDouble)).to(u.device(), u.scalar_type()).unsqueeze(1);  // [n, 1]
    const int64_t n_warm = static_cast<int64_t>(warm.size());

    at::Tensor term;
    if (n_warm > 0 && n_warm < n) {
      // Partial warm-up: weights normalised over the warm concepts, no momentum.
      const at::Tensor idx = at::tensor(warm, at::TensorOptions(at::kLong)).to(u.device());
      at::Tensor Wp = Wt.index_select(0, idx);                      // [n_warm, 1]
      Wp = at::where(Wp < 0, at::zeros_like(Wp), Wp);
      Wp = Wp / Wp.sum(0);
      term = at::einsum("cb,cbijk->bijk", {Wp, Gs.index_select(0, idx)});  // [1, C, h, w]
    }
    // Always: the unnormalised sum over all concepts plus momentum, and the momentum update.
    const at::Tensor Wf = at::nan_to_num(at::where(Wt < 0, at::zeros_like(Wt), Wt));
    at::Tensor S = at::einsum("cb,cbijk->bijk", {Wf, Gs});  // [1, C, h, w]
    S = S + m * s_m;
    next_momentum.push_back(m * beta + S * (1.0 - beta));
    if (n_warm == n) term = S;
    out.applied[static_cast<size_t>(b)] = term.defined();
    guidance.push_back(term.defined() ? term : at::zeros_like(u));
  }
  out.guidance = at::cat(guidance);        // [B, C, h, w]
  out.momentum = at::cat(next_momentum);   // [B, C, h, w]
  return out;
}

Conditioning encode_edit_prompts(StableDiffusionModel& model, const std::vector<std::string>& prompts) {
  return make_text_conditioner(model)->encode_edits(prompts);
}

SemanticGuidance::SemanticGuidance(Conditioning edit_embeddings, SemanticGuidanceSettings settings)
    : table_(std::move(edit_embeddings)), settings_(std::move(settings)) {
  if (table_.defined() && table_.context.dim() != 3) {
    std::ostringstream ss;
    ss << "edit embeddings must be [K, 77, D], got " << table_.context.sizes();
    throw_bad_input("semantic guidance", ss.str());
  }
  validate(settings_, table_.rows(), "semantic guidance");
}

void SemanticGuidance::begin(size_t steps, int64_t batch_size) {
  if (static_cast<int64_t>(settings_.images.size()) != batch_size)
    throw_bad_input("semantic guidance",
                    "concept lists for " + std::to_string(settings_.images.size()) + " images, the batch has " +
                        std::to_string(batch_size),
                    "give one concept list per image (empty for an image without edits)");
  num_steps_ = static_cast<int64_t>(steps);
  batch_ = batch_size;
  momentum_ = at::Tensor();
  rows_.clear();
  rows_step_ = std::numeric_limits<size_t>::max();
  rows_per_step_.clear();
}

Conditioning SemanticGuidance::embeddings(size_t step, std::vector<int64_t>* latent_rows) {
  rows_ = edit_rows(settings_, static_cast<int64_t>(step), num_steps_, evaluate_all_);
  rows_step_ = step;
  if (rows_per_step_.size() <= step) rows_per_step_.resize(step + 1, 0);
  rows_per_step_[step] = static_cast<int64_t>(rows_.size());
  latent_rows->clear();
  if (rows_.empty()) return {};
  std::vector<int64_t> embedding;
  for (const auto& r : rows_) {
    latent_rows->push_back(r.image);
    embedding.push_back(r.embedding);
  }
  return table_.index_select(at::tensor(embedding, at::TensorOptions(at::kLong)));  // E rows
}

at::Tensor SemanticGuidance::apply(size_t step, const at::Tensor& eps_uncond, const at::Tensor& eps_text,
                                   const at::Tensor& eps_extra, const at::Tensor& g) {
  TORCH_CHECK(step == rows_step_, "semantic guidance: apply() at step ", step, " without embeddings() for it");
  const SemanticStep r = semantic_guidance_step(settings_, static_cast<int64_t>(step), num_steps_, eps_uncond,
                                                eps_extra, rows_, momentum_);
  momentum_ = r.momentum;
  if (observer_) {
    SemanticStepRecord rec;
    rec.step = step;
    rec.eps_uncond = eps_uncond;
    rec.eps_text = eps_text;
    rec.eps_edit = rows_.empty() ? at::Tensor() : eps_extra;
    rec.rows = rows_;
    rec.guidance = r.guidance;
    rec.applied = r.applied;
    observer_(rec);
  }
  const bool any = std::any_of(r.applied.begin(), r.applied.end(), [](bool a) { return a; });
  return any ? g + r.guidance : g;
}

int64_t SemanticGuidance::edit_rows_total() const {
  int64_t total = 0;
  for (int64_t n : rows_per_step_) total += n;
  return total;
}

}  // namespace fairdiff
