// A PNG as the audit reads it: png_is_complete, read_png_text (tEXt/iTXt/zTXt chunks),
// read_png_rgb (stb_image), a thumbnail and the hue classifier.
#include "fairdiff/audit.h"
#include "fuzz_util.h"
#include "png_io.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::scratch_dir() + "/image.png";
  fuzz::write_file(path, std::string(reinterpret_cast<const char*>(data), size));
  const bool complete = fairdiff::png_is_complete(path);
  fuzz::refuse_cleanly([&] {
    const auto texts = fairdiff::read_png_text(path);
    if (!complete) std::abort();  // read_png_text refuses what png_is_complete calls incomplete
    for (const auto& t : texts)
      if (t.keyword.empty()) std::abort();
  });
  fuzz::refuse_cleanly([&] {
    const fairdiff::RgbImage image = fairdiff::read_png_rgb(path);
    if (image.rgb.size() != static_cast<size_t>(image.width) * image.height * 3) std::abort();
    static const fairdiff::HueClassifier hue;
    hue.classify(image.rgb.data(), image.width, image.height);
    fairdiff::make_thumbnail(image, 16);
  });
  return 0;
}
