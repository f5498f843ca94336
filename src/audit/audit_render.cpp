// The audit's pictures: a bar chart of target against achieved shares, and a contact
// sheet of the images. Drawn on a plain RGB canvas with our own 5x7 bitmap font, so the
// audit needs no graphics library and renders the same everywhere.
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "fairdiff/audit.h"
#include "png_io.h"

namespace fairdiff {
namespace {

// 5x7 glyphs (8 rows: the last for descenders); bit 4 of a row is its leftmost pixel.
struct Glyph {
  char c;
  uint8_t rows[8];
};

const Glyph kFont[] = {
    {' ', {0, 0, 0, 0, 0, 0, 0, 0}},          {'!', {4, 4, 4, 4, 4, 0, 4, 0}},
    {'"', {10, 10, 0, 0, 0, 0, 0, 0}},        {'#', {10, 10, 31, 10, 31, 10, 10, 0}},
    {'$', {4, 15, 20, 14, 5, 30, 4, 0}},      {'%', {25, 26, 2, 4, 8, 11, 19, 0}},
    {'&', {12, 18, 20, 8, 21, 18, 13, 0}},    {'\'', {4, 4, 0, 0, 0, 0, 0, 0}},
    {'(', {2, 4, 8, 8, 8, 4, 2, 0}},          {')', {8, 4, 2, 2, 2, 4, 8, 0}},
    {'*', {0, 4, 21, 14, 21, 4, 0, 0}},       {'+', {0, 4, 4, 31, 4, 4, 0, 0}},
    {',', {0, 0, 0, 0, 0, 6, 4, 8}},          {'-', {0, 0, 0, 31, 0, 0, 0, 0}},
    {'.', {0, 0, 0, 0, 0, 12, 12, 0}},        {'/', {1, 2, 2, 4, 8, 8, 16, 0}},
    {'0', {14, 17, 19, 21, 25, 17, 14, 0}},   {'1', {4, 12, 4, 4, 4, 4, 14, 0}},
    {'2', {14, 17, 1, 2, 4, 8, 31, 0}},       {'3', {31, 2, 4, 2, 1, 17, 14, 0}},
    {'4', {2, 6, 10, 18, 31, 2, 2, 0}},       {'5', {31, 16, 30, 1, 1, 17, 14, 0}},
    {'6', {6, 8, 16, 30, 17, 17, 14, 0}},     {'7', {31, 1, 2, 4, 8, 8, 8, 0}},
    {'8', {14, 17, 17, 14, 17, 17, 14, 0}},   {'9', {14, 17, 17, 15, 1, 2, 12, 0}},
    {':', {0, 12, 12, 0, 12, 12, 0, 0}},      {';', {0, 12, 12, 0, 12, 4, 8, 0}},
    {'<', {2, 4, 8, 16, 8, 4, 2, 0}},         {'=', {0, 0, 31, 0, 31, 0, 0, 0}},
    {'>', {8, 4, 2, 1, 2, 4, 8, 0}},          {'?', {14, 17, 1, 2, 4, 0, 4, 0}},
    {'@', {14, 17, 1, 13, 21, 21, 14, 0}},    {'A', {14, 17, 17, 31, 17, 17, 17, 0}},
    {'B', {30, 17, 17, 30, 17, 17, 30, 0}},   {'C', {14, 17, 16, 16, 16, 17, 14, 0}},
    {'D', {28, 18, 17, 17, 17, 18, 28, 0}},   {'E', {31, 16, 16, 30, 16, 16, 31, 0}},
    {'F', {31, 16, 16, 30, 16, 16, 16, 0}},   {'G', {14, 17, 16, 23, 17, 17, 15, 0}},
    {'H', {17, 17, 17, 31, 17, 17, 17, 0}},   {'I', {14, 4, 4, 4, 4, 4, 14, 0}},
    {'J', {7, 2, 2, 2, 2, 18, 12, 0}},        {'K', {17, 18, 20, 24, 20, 18, 17, 0}},
    {'L', {16, 16, 16, 16, 16, 16, 31, 0}},   {'M', {17, 27, 21, 21, 17, 17, 17, 0}},
    {'N', {17, 17, 25, 21, 19, 17, 17, 0}},   {'O', {14, 17, 17, 17, 17, 17, 14, 0}},
    {'P', {30, 17, 17, 30, 16, 16, 16, 0}},   {'Q', {14, 17, 17, 17, 21, 18, 13, 0}},
    {'R', {30, 17, 17, 30, 20, 18, 17, 0}},   {'S', {15, 16, 16, 14, 1, 1, 30, 0}},
    {'T', {31, 4, 4, 4, 4, 4, 4, 0}},         {'U', {17, 17, 17, 17, 17, 17, 14, 0}},
    {'V', {17, 17, 17, 17, 17, 10, 4, 0}},    {'W', {17, 17, 17, 21, 21, 21, 10, 0}},
    {'X', {17, 17, 10, 4, 10, 17, 17, 0}},    {'Y', {17, 17, 10, 4, 4, 4, 4, 0}},
    {'Z', {31, 1, 2, 4, 8, 16, 31, 0}},       {'[', {14, 8, 8, 8, 8, 8, 14, 0}},
    {']', {14, 2, 2, 2, 2, 2, 14, 0}},        {'_', {0, 0, 0, 0, 0, 0, 31, 0}},
    {'|', {4, 4, 4, 4, 4, 4, 4, 0}},          {'a', {0, 0, 14, 1, 15, 17, 15, 0}},
    {'b', {16, 16, 22, 25, 17, 17, 30, 0}},   {'c', {0, 0, 14, 16, 16, 17, 14, 0}},
    {'d', {1, 1, 13, 19, 17, 17, 15, 0}},     {'e', {0, 0, 14, 17, 31, 16, 14, 0}},
    {'f', {6, 9, 8, 28, 8, 8, 8, 0}},         {'g', {0, 0, 15, 17, 17, 15, 1, 14}},
    {'h', {16, 16, 22, 25, 17, 17, 17, 0}},   {'i', {4, 0, 12, 4, 4, 4, 14, 0}},
    {'j', {2, 0, 6, 2, 2, 2, 18, 12}},        {'k', {16, 16, 18, 20, 24, 20, 18, 0}},
    {'l', {12, 4, 4, 4, 4, 4, 14, 0}},        {'m', {0, 0, 26, 21, 21, 21, 21, 0}},
    {'n', {0, 0, 22, 25, 17, 17, 17, 0}},     {'o', {0, 0, 14, 17, 17, 17, 14, 0}},
    {'p', {0, 0, 30, 17, 17, 30, 16, 16}},    {'q', {0, 0, 15, 17, 17, 15, 1, 1}},
    {'r', {0, 0, 22, 25, 16, 16, 16, 0}},     {'s', {0, 0, 15, 16, 14, 1, 30, 0}},
    {'t', {8, 8, 28, 8, 8, 9, 6, 0}},         {'u', {0, 0, 17, 17, 17, 19, 13, 0}},
    {'v', {0, 0, 17, 17, 17, 10, 4, 0}},      {'w', {0, 0, 17, 17, 21, 21, 10, 0}},
    {'x', {0, 0, 17, 10, 4, 10, 17, 0}},      {'y', {0, 0, 17, 17, 17, 15, 1, 14}},
    {'z', {0, 0, 31, 2, 4, 8, 31, 0}},
};
constexpr int kAdvance = 6;  // glyph width at scale 1, spacing included

const Glyph& glyph(char c) {
  for (const Glyph& g : kFont)
    if (g.c == c) return g;
  return glyph('?');
}

// One drawable character per code point: UTF-8 beyond ASCII shows as '?'.
std::string ascii(const std::string& utf8) {
  std::string out;
  for (unsigned char c : utf8) {
    if ((c & 0xC0) == 0x80) continue;  // a continuation byte
    out.push_back(c < 0x80 ? static_cast<char>(c) : '?');
  }
  return out;
}

int text_width(const std::string& text, int scale) { return static_cast<int>(ascii(text).size()) * kAdvance * scale; }

// `text` cut with "..." to fit max_width pixels.
std::string fit(const std::string& text, int max_width, int scale) {
  std::string s = ascii(text);
  const size_t room = static_cast<size_t>(std::max(0, max_width / (kAdvance * scale)));
  if (s.size() <= room) return s;
  return room <= 3 ? s.substr(0, room) : s.substr(0, room - 3) + "...";
}

const Rgb kWhite{255, 255, 255}, kInk{40, 40, 40}, kMuted{120, 120, 120}, kGrid{222, 222, 222};

Rgb blend(Rgb a, Rgb b, double t) {  // (1 - t) a + t b
  Rgb out;
  for (int k = 0; k < 3; ++k) out[k] = static_cast<uint8_t>(std::lround((1 - t) * a[k] + t * b[k]));
  return out;
}

class Canvas {
 public:
  Canvas(int width, int height) : width_(width), height_(height), rgb_(static_cast<size_t>(width) * height * 3, 255) {}

  void fill(int x, int y, int w, int h, Rgb c) {
    for (int yy = std::max(0, y); yy < std::min(height_, y + h); ++yy)
      for (int xx = std::max(0, x); xx < std::min(width_, x + w); ++xx)
        std::copy(c.begin(), c.end(), &rgb_[(static_cast<size_t>(yy) * width_ + xx) * 3]);
  }

  void frame(int x, int y, int w, int h, int t, Rgb c) {
    fill(x, y, w, t, c);
    fill(x, y + h - t, w, t, c);
    fill(x, y, t, h, c);
    fill(x + w - t, y, t, h, c);
  }

  // Left-aligned at (x, y), the top of the glyph cell.
  void text(int x, int y, const std::string& s, Rgb c, int scale = 1) {
    for (char ch : ascii(s)) {
      const Glyph& g = glyph(ch);
      for (int row = 0; row < 8; ++row)
        for (int col = 0; col < 5; ++col)
          if (g.rows[row] & (16 >> col)) fill(x + col * scale, y + row * scale, scale, scale, c);
      x += kAdvance * scale;
    }
  }

  void text_centred(int centre_x, int y, const std::string& s, Rgb c, int scale = 1) {
    text(centre_x - text_width(s, scale) / 2, y, s, c, scale);
  }

  void blit(const RgbImage& image, int x, int y) {
    for (int yy = 0; yy < image.height; ++yy)
      for (int xx = 0; xx < image.width; ++xx) {
        const uint8_t* p = &image.rgb[(static_cast<size_t>(yy) * image.width + xx) * 3];
        fill(x + xx, y + yy, 1, 1, {p[0], p[1], p[2]});
      }
  }

  // A thick X over a white square: "the classifier disagrees".
  void cross_mark(int x, int y, int size) {
    fill(x, y, size, size, kWhite);
    frame(x, y, size, size, 1, kInk);
    for (int t = 3; t < size - 3; ++t) {
      fill(x + t, y + t, 2, 2, kInk);
      fill(x + size - 2 - t, y + t, 2, 2, kInk);
    }
  }

  void save(const std::string& path) const { write_png(path, rgb_.data(), width_, height_, {}); }

 private:
  int width_, height_;
  std::vector<uint8_t> rgb_;
};

std::string percent(double share) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%.0f%%", 100.0 * share);
  return buf;
}

std::string title(const AuditReport& r) {
  return "fairdiff audit: " + r.attribute + " (" + r.classifier + " classifier), " + std::to_string(r.images.size()) + " images";
}

// ---- chart ----

constexpr int kMargin = 16, kAxis = 36, kSlot = 96, kBar = 30, kPlot = 150;
constexpr int kChartHeader = 64, kPanelTop = 50, kPanelHeight = kPanelTop + kPlot + 34;

// One group (or "unclassified") of a prompt: the target bar beside the achieved bar.
struct Slot {
  std::string name;
  Rgb colour;
  std::optional<double> target;
  double share, low, high;
};

void draw_slot(Canvas& c, const Slot& s, int x, int base) {
  const auto y_of = [base](double share) { return base - static_cast<int>(std::lround(share * kPlot)); };
  const int target_x = x + kSlot / 2 - kBar - 3, achieved_x = x + kSlot / 2 + 3;
  if (s.target) {
    const int top = y_of(*s.target);
    c.fill(target_x, top, kBar, base - top, blend(s.colour, kWhite, 0.7));
    c.frame(target_x, top, kBar, base - top + 1, 2, s.colour);
    c.text_centred(target_x + kBar / 2, top - 11, percent(*s.target), kMuted);
  }
  const int top = y_of(s.share), centre = achieved_x + kBar / 2;
  c.fill(achieved_x, top, kBar, base - top, s.colour);
  // The 95% interval as a whisker with caps.
  const int low = y_of(s.low), high = y_of(s.high);
  c.fill(centre - 1, high, 2, low - high + 1, kInk);
  c.fill(centre - 5, high, 10, 2, kInk);
  c.fill(centre - 5, low - 1, 10, 2, kInk);
  c.text_centred(centre, std::min(top, high) - 11, percent(s.share), kInk);
  c.text_centred(x + kSlot / 2, base + 6, fit(s.name, kSlot - 4, 1), kInk);
}

void draw_panel(Canvas& c, const AuditReport& r, const PromptAudit& p, int top, int width, bool with_unclassified) {
  c.text(kMargin, top + 8, fit("\"" + p.prompt + "\"", width - 2 * kMargin, 2), kInk, 2);
  std::string sub = std::to_string(p.images) + " images";
  if (p.unclassified) sub += ", " + std::to_string(p.unclassified) + " unclassified";
  if (const auto hit = p.hit_rate()) sub += ", assigned group reached in " + percent(*hit);
  if (!p.groups.empty() && !p.groups.front().target) sub += ", no target (unguided)";
  c.text(kMargin, top + 30, fit(sub, width - 2 * kMargin, 1), kMuted);

  const int left = kMargin + kAxis, base = top + kPanelTop + kPlot, right = width - kMargin;
  for (int q = 0; q <= 4; ++q) {  // gridlines every 25%
    const int y = base - q * kPlot / 4;
    c.fill(left, y, right - left, 1, q == 0 ? kInk : kGrid);
    const std::string label = std::to_string(q * 25) + "%";
    c.text(left - 6 - text_width(label, 1), y - 4, label, kMuted);
  }
  std::vector<Slot> slots;
  for (size_t g = 0; g < p.groups.size(); ++g) {
    const GroupShare& s = p.groups[g];
    slots.push_back({s.name, r.colours[g], s.target, s.share, s.low, s.high});
  }
  if (with_unclassified) {
    const Interval i = wilson_interval(p.unclassified, p.images);
    slots.push_back({"unclassified", {150, 150, 150}, std::nullopt, double(p.unclassified) / double(p.images), i.low, i.high});
  }
  for (size_t k = 0; k < slots.size(); ++k) draw_slot(c, slots[k], left + 8 + static_cast<int>(k) * kSlot, base);
}

void draw_chart_legend(Canvas& c, int y) {
  const Rgb swatch{110, 110, 110};
  int x = kMargin;
  c.fill(x, y, 14, 10, blend(swatch, kWhite, 0.7));
  c.frame(x, y, 14, 10, 2, swatch);
  c.text(x + 20, y + 1, "target", kInk);
  x += 20 + text_width("target", 1) + 18;
  c.fill(x, y, 14, 10, swatch);
  c.text(x + 20, y + 1, "achieved", kInk);
  x += 20 + text_width("achieved", 1) + 18;
  c.fill(x + 6, y - 1, 2, 12, kInk);
  c.fill(x + 2, y - 1, 10, 2, kInk);
  c.fill(x + 2, y + 9, 10, 2, kInk);
  c.text(x + 20, y + 1, "95% interval of the achieved share", kInk);
}

// ---- sheet ----

constexpr int kFrame = 3, kCell = kSheetThumbnail + 2 * kFrame, kGap = 8, kLabel = 11, kColumns = 12;
constexpr int kSheetHeader = 64, kPromptTitle = 22;

void draw_cell(Canvas& c, const AuditReport& r, const ImageVerdict& v, int x, int y) {
  if (v.assigned >= 0) c.frame(x, y, kCell, kCell, kFrame, r.colours[static_cast<size_t>(v.assigned)]);
  else c.frame(x + kFrame - 1, y + kFrame - 1, kCell - 2 * kFrame + 2, kCell - 2 * kFrame + 2, 1, {170, 170, 170});
  c.fill(x + kFrame, y + kFrame, kSheetThumbnail, kSheetThumbnail, {235, 235, 235});
  const RgbImage& t = v.thumbnail;  // centred: thumbnails keep the picture's aspect
  c.blit(t, x + kFrame + (kSheetThumbnail - t.width) / 2, y + kFrame + (kSheetThumbnail - t.height) / 2);
  if (v.assigned >= 0 && v.classified != v.assigned) c.cross_mark(x + kCell - kFrame - 18, y + kFrame, 18);
  const std::string label = v.classified >= 0 ? r.groups[static_cast<size_t>(v.classified)] : "?";
  c.text_centred(x + kCell / 2, y + kCell + 2, fit(label, kCell, 1), kInk);
}

void draw_sheet_legend(Canvas& c, const AuditReport& r, int y, int width) {
  c.text(kMargin, y, fit("frame: assigned group; X: classified otherwise; label: classified group (? = unclassified)",
                         width - 2 * kMargin, 1), kMuted);
  int x = kMargin;
  for (size_t g = 0; g < r.groups.size() && x < width - kMargin; ++g) {
    c.fill(x, y + 14, 12, 10, r.colours[g]);
    c.text(x + 16, y + 15, r.groups[g], kInk);
    x += 16 + text_width(r.groups[g], 1) + 14;
  }
}

}  // namespace

RgbImage make_thumbnail(const RgbImage& in, int max_side) {
  RgbImage out;
  if (in.width <= 0 || in.height <= 0 || max_side <= 0) return out;
  const double scale = static_cast<double>(max_side) / std::max(in.width, in.height);
  out.width = std::max(1, static_cast<int>(std::lround(in.width * scale)));
  out.height = std::max(1, static_cast<int>(std::lround(in.height * scale)));
  out.rgb.resize(static_cast<size_t>(out.width) * out.height * 3);
  // Each output pixel averages the source box it covers (at least one pixel when growing).
  const auto span = [](int i, int n_in, int n_out) {
    const int a = static_cast<int>(static_cast<int64_t>(i) * n_in / n_out);
    return std::make_pair(a, std::max(a + 1, static_cast<int>(static_cast<int64_t>(i + 1) * n_in / n_out)));
  };
  for (int y = 0; y < out.height; ++y) {
    const auto [y0, y1] = span(y, in.height, out.height);
    for (int x = 0; x < out.width; ++x) {
      const auto [x0, x1] = span(x, in.width, out.width);
      for (int k = 0; k < 3; ++k) {
        int64_t sum = 0;
        for (int sy = y0; sy < y1; ++sy)
          for (int sx = x0; sx < x1; ++sx) sum += in.rgb[(static_cast<size_t>(sy) * in.width + sx) * 3 + k];
        const int64_t n = static_cast<int64_t>(y1 - y0) * (x1 - x0);
        out.rgb[(static_cast<size_t>(y) * out.width + x) * 3 + k] = static_cast<uint8_t>((sum + n / 2) / n);
      }
    }
  }
  return out;
}

void write_audit_chart(const AuditReport& r, const std::string& path) {
  const bool with_unclassified = r.unclassified > 0;
  const int slots = static_cast<int>(r.groups.size()) + (with_unclassified ? 1 : 0);
  const int width = std::max({560, 2 * kMargin + kAxis + 16 + slots * kSlot, 2 * kMargin + text_width(title(r), 2)});
  const int shown = std::min<int>(static_cast<int>(r.prompts.size()), kChartMaxPrompts);
  const int height = kChartHeader + shown * kPanelHeight + kMargin + (shown < static_cast<int>(r.prompts.size()) ? 14 : 0);
  Canvas c(width, height);
  c.text(kMargin, 12, fit(title(r), width - 2 * kMargin, 2), kInk, 2);
  draw_chart_legend(c, 40);
  for (int p = 0; p < shown; ++p)
    draw_panel(c, r, r.prompts[static_cast<size_t>(p)], kChartHeader + p * kPanelHeight, width, with_unclassified);
  if (shown < static_cast<int>(r.prompts.size()))
    c.text(kMargin, height - kMargin - 10,
           "first " + std::to_string(shown) + " of " + std::to_string(r.prompts.size()) + " prompts (the JSON has all)", kMuted);
  c.save(path);
}

void write_audit_sheet(const AuditReport& r, const std::string& path) {
  // The images each shown prompt has on the sheet (those with a thumbnail), in run order.
  std::vector<std::vector<const ImageVerdict*>> shown(std::min<size_t>(r.prompts.size(), kSheetMaxPrompts));
  for (const ImageVerdict& v : r.images)
    if (v.prompt < shown.size() && !v.thumbnail.rgb.empty()) shown[v.prompt].push_back(&v);
  const int width = 2 * kMargin + kColumns * (kCell + kGap) - kGap, row_height = kCell + kLabel + kGap;
  const bool cut = shown.size() < r.prompts.size();
  int height = kSheetHeader + kMargin + (cut ? 14 : 0);
  for (const auto& images : shown)
    height += kPromptTitle + static_cast<int>((images.size() + kColumns - 1) / kColumns) * row_height;
  Canvas c(width, height);
  c.text(kMargin, 12, fit(title(r), width - 2 * kMargin, 2), kInk, 2);
  draw_sheet_legend(c, r, 36, width);
  int y = kSheetHeader;
  for (size_t p = 0; p < shown.size(); ++p) {
    const PromptAudit& prompt = r.prompts[p];
    std::string head = "\"" + prompt.prompt + "\", " + std::to_string(prompt.images) + " images";
    if (static_cast<int64_t>(shown[p].size()) < prompt.images) head += " (first " + std::to_string(shown[p].size()) + " shown)";
    c.text(kMargin, y + 6, fit(head, width - 2 * kMargin, 1), kInk);
    y += kPromptTitle;
    for (size_t k = 0; k < shown[p].size(); ++k)
      draw_cell(c, r, *shown[p][k], kMargin + static_cast<int>(k % kColumns) * (kCell + kGap),
                y + static_cast<int>(k / kColumns) * row_height);
    y += static_cast<int>((shown[p].size() + kColumns - 1) / kColumns) * row_height;
  }
  if (cut)
    c.text(kMargin, y + 2, "first " + std::to_string(shown.size()) + " of " + std::to_string(r.prompts.size()) + " prompts", kMuted);
  c.save(path);
}

}  // namespace fairdiff
