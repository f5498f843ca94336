// fairdiff-toy-tokenizer: trains the SentencePiece tokenizer of the shipped toy model
// on the captions of the toy world's training stream, with the sentencepiece trainer.
//
//   fairdiff-toy-tokenizer --out work/tokenizer [--seed 0] [--captions 20000]
//   -> work/tokenizer/spiece.model, tokenizer_config.json
//
// Torch-free on purpose: libsentencepiece exports its embedded protobuf, which crashes a
// process that also loads LibTorch's (see CMakeLists.txt). fairdiff itself reads the
// .model file with its own reader (src/tokenizer_sentencepiece.cpp).
#include <sentencepiece_trainer.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "fs_util.h"
#include "toy_world.h"

namespace fs = std::filesystem;

int main(int argc, char** argv) {
  CLI::App app{"fairdiff-toy-tokenizer: train the toy model's SentencePiece tokenizer on the world's captions"};
  std::string out_dir;
  uint64_t seed = 0;
  int captions = 20000;
  int max_length = 16;
  app.add_option("--out", out_dir, "tokenizer folder to write")->required();
  app.add_option("--seed", seed, "seed of the caption stream (the trainer's data seed)")->capture_default_str();
  app.add_option("--captions", captions, "captions to train on")->capture_default_str();
  app.add_option("--max-length", max_length, "model_max_length: tokens per prompt with BOS/EOS")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  fs::create_directories(out_dir);
  const fairdiff::toy::World world;
  const fs::path corpus = fs::path(out_dir) / "captions.txt";
  {
    std::ofstream f(corpus);
    // The trainer's captions (stream seed + 2 in fairdiff-train-toy), and every colour and
    // class word on its own, so no word of the world is left to <unk>.
    for (int i = 0; i < captions; ++i) f << world.sample(seed + 2, static_cast<uint64_t>(i)).caption << "\n";
    for (const auto& c : world.colours()) f << c.name << "\n";
    for (const auto& c : world.classes()) f << c.name << "\n";
  }
  // Unigram model over whole words of a tiny vocabulary; ids 0-3 are <unk>, <s>, </s>,
  // <pad>. One thread: the result must not depend on scheduling.
  const std::string args = "--input=" + corpus.string() + " --model_prefix=" + (fs::path(out_dir) / "spiece").string() +
                           " --model_type=unigram --vocab_size=48 --hard_vocab_limit=false"
                           " --character_coverage=1.0 --normalization_rule_name=nmt_nfkc_cf"
                           " --num_threads=1 --minloglevel=2"
                           " --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=3";
  const auto status = sentencepiece::SentencePieceTrainer::Train(args);
  if (!status.ok()) {
    std::fprintf(stderr, "fairdiff-toy-tokenizer: error: sentencepiece training failed: %s\n",
                 status.ToString().c_str());
    return 1;
  }
  fs::remove(corpus);
  fs::remove(fs::path(out_dir) / "spiece.vocab");
  const nlohmann::json config = {{"model_max_length", max_length},
                                 {"bos_token", "<s>"},
                                 {"eos_token", "</s>"},
                                 {"unk_token", "<unk>"},
                                 {"pad_token", "<pad>"},
                                 {"tokenizer_class", "SentencePieceTokenizer"}};
  fairdiff::write_file_atomic((fs::path(out_dir) / "tokenizer_config.json").string(), config.dump(2) + "\n");
  std::printf("wrote %s/spiece.model\n", out_dir.c_str());
  return 0;
}
