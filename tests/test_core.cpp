// The small shared helpers: strings, the scheduler table, the UTF-8 decoder.
#include "config_json.h"
#include "scheduler_table.h"
#include "string_util.h"
#include "test_util.h"
#include "unicode.h"

namespace fairdiff {
namespace {

TEST(StringUtil, JoinTrimAffixes) {
  EXPECT_EQ(join({"a", "b", "c"}), "a, b, c");
  EXPECT_EQ(join({"a", "b"}, " "), "a b");
  EXPECT_EQ(join({}), "");
  EXPECT_EQ(trim(" \t a b \r\n"), "a b");
  EXPECT_EQ(trim(" \t\r\n"), "");
  EXPECT_TRUE(starts_with("cuda:1", "cuda"));
  EXPECT_FALSE(starts_with("cu", "cuda"));
  EXPECT_TRUE(ends_with("model.safetensors", ".safetensors"));
  EXPECT_FALSE(ends_with("x", ".safetensors"));
}

TEST(StringUtil, ShapesAndFirstNames) {
  EXPECT_EQ(shape_str({2, 4, 8, 8}), "[2,4,8,8]");
  EXPECT_EQ(shape_str({}), "[]");
  EXPECT_EQ(first_names({"a", "b"}), "a, b");
  EXPECT_EQ(first_names({"a", "b", "c", "d", "e", "f"}), "a, b, c, d, e, ... (6 in all)");
  EXPECT_EQ(first_names({"a", "b", "c"}, 2), "a, b, ... (3 in all)");
}

TEST(SchedulerTable, OverridesAndNames) {
  EXPECT_EQ(sampling_methods(), (std::vector<std::string>{"pndm", "ddim", "euler", "euler_a", "dpm++2m", "lms"}));
  EXPECT_EQ(scheduler_override("", "karras"), "");
  EXPECT_EQ(scheduler_override("plms", ""), "pndm");
  EXPECT_EQ(scheduler_override("ddim", "karras"), "ddim");
  EXPECT_EQ(scheduler_override("euler_a", "karras"), "euler_a");
  EXPECT_EQ(scheduler_override("euler", "discrete"), "euler");
  EXPECT_EQ(scheduler_override("euler", "karras"), "euler_karras");
  EXPECT_EQ(scheduler_override("dpm++2m", ""), "dpmpp_2m");
  EXPECT_EQ(scheduler_override("dpm++2m", "karras"), "dpmpp_2m_karras");
  EXPECT_EQ(scheduler_override("lms", "karras"), "lms_karras");
  EXPECT_EQ(a1111_sampler_name("EulerAncestralDiscreteScheduler"), "Euler a");
  EXPECT_EQ(a1111_sampler_name("PNDMScheduler"), "PLMS");
  EXPECT_EQ(a1111_sampler_name("UniPCMultistepScheduler"), "UniPCMultistepScheduler");
  ASSERT_NE(find_scheduler_class("DPMSolverMultistepScheduler"), nullptr);
  EXPECT_STREQ(find_scheduler_class("DPMSolverMultistepScheduler")->method, "dpm++2m");
  EXPECT_EQ(find_scheduler_method("heun"), nullptr);
}

TEST(Unicode, DecodesWellFormedAndReplacesEachBadByte) {
  EXPECT_EQ(utf8_decode("a\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"), (std::u32string{U'a', 0xE9, 0x20AC, 0x1F600}));
  EXPECT_EQ(utf8_decode("\xc0\xaf"), (std::u32string{0xFFFD, 0xFFFD}));     // overlong '/'
  EXPECT_EQ(utf8_decode("\xed\xa0\x80"), (std::u32string(3, 0xFFFD)));      // a surrogate
  EXPECT_EQ(utf8_decode("\xe2\x82"), (std::u32string{0xFFFD, 0xFFFD}));     // truncated
  char32_t cp = 0;
  EXPECT_EQ(utf8_char("\xe2\x82\xac!", &cp), 3u);
  EXPECT_EQ(cp, 0x20ACu);
  EXPECT_EQ(utf8_char("", &cp), 0u);
  EXPECT_EQ(utf8_encode(utf8_decode("x\xc3\xa9\xf0\x9f\x98\x80")), "x\xc3\xa9\xf0\x9f\x98\x80");
}

TEST(StringUtil, InvalidUtf8Offset) {
  EXPECT_EQ(invalid_utf8_offset("a\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"), std::string::npos);
  EXPECT_EQ(invalid_utf8_offset(""), std::string::npos);
  EXPECT_EQ(invalid_utf8_offset("ab\xff"), 2u);
  EXPECT_EQ(invalid_utf8_offset("\xc0\xaf"), 0u);          // overlong '/'
  EXPECT_EQ(invalid_utf8_offset("x\xed\xa0\x80"), 1u);     // a surrogate
  EXPECT_EQ(invalid_utf8_offset("xy\xe2\x82"), 2u);         // truncated
  EXPECT_EQ(invalid_utf8_offset("\xf4\x90\x80\x80"), 0u); // above U+10FFFF
  EXPECT_EQ(invalid_utf8_offset("\xf4\x8f\xbf\xbf"), std::string::npos);  // U+10FFFF itself
}

TEST(ConfigJson, WholeNumbersStayInsideInt64) {
  using nlohmann::json;
  EXPECT_EQ(whole_number(json(7)), 7);
  EXPECT_EQ(whole_number(json(-7)), -7);
  EXPECT_EQ(whole_number(json(2.0)), 2);
  EXPECT_EQ(whole_number(json::parse("9223372036854775807")), INT64_MAX);
  EXPECT_EQ(whole_number(json::parse("-9223372036854775808")), INT64_MIN);
  EXPECT_FALSE(whole_number(json::parse("9223372036854775808")));   // unsigned, past int64
  EXPECT_FALSE(whole_number(json::parse("18446744073709551615")));
  EXPECT_FALSE(whole_number(json(1.8446744073709552e20)));         // casting it would be UB
  EXPECT_FALSE(whole_number(json(9223372036854775808.0)));         // 2^63
  EXPECT_FALSE(whole_number(json(2.5)));
  EXPECT_FALSE(whole_number(json("2")));
  const json config = {{"layers_per_block", 1.8446744073709552e20}, {"n", 4.0}};
  EXPECT_EQ(config_json::get_int(config, "n", 0, "c.json"), 4);
  test::expect_error([&] { config_json::get_int(config, "layers_per_block", 0, "c.json"); }, ErrorKind::BadInput,
                     {"c.json", "layers_per_block", "wrong type"});
}

}  // namespace
}  // namespace fairdiff
