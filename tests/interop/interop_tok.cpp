// interop_tok TOKENIZER IN.json OUT.json: loads a Hugging Face tokenizer.json (data/hf_tokenizer.h),
// a sentencepiece .model file (data/tokenizer.h) or a GGUF file's vocabulary (data/gguf_tokenizer.h). IN.json is a list of strings, or an object
// {"texts": [strings], "ids": [[ids]...]}. For the strings it writes
// {"ids": [[...]...], "decoded": [...], "bos": id, "eos": id, "pad": id, "vocab_size": n} to OUT.json
// (decoded: decode(encode(text))), plus "decoded_ids": [decode(ids)...] for the given id lists, for
// tests/interop/test_hf_tokenizers.py and test_gguf_tokenizer.py. Exit 1 with the error otherwise.
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "data/gguf_tokenizer.h"
#include "data/hf_tokenizer.h"
#include "data/tokenizer.h"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: interop_tok TOKENIZER IN.json OUT.json\n";
    return 2;
  }
  try {
    const std::string path = argv[1];
    const bool spm = path.size() > 6 && path.compare(path.size() - 6, 6, ".model") == 0;
    const bool gguf = path.size() > 5 && path.compare(path.size() - 5, 5, ".gguf") == 0;
    auto tok = gguf ? qf::data::load_gguf_tokenizer(path)
               : spm ? qf::data::load_sentencepiece(path)
                     : qf::data::load_hf_tokenizer(path);
    auto in = nlohmann::json::parse(qf::fs::read_file(argv[2]));
    const nlohmann::json texts = in.is_array() ? in : in.value("texts", nlohmann::json::array());
    nlohmann::json out = {{"ids", nlohmann::json::array()}, {"decoded", nlohmann::json::array()},
                          {"bos", tok->bos_id()}, {"eos", tok->eos_id()}, {"pad", tok->pad_id()},
                          {"vocab_size", tok->vocab_size()}};
    for (auto& s : texts) {
      auto ids = tok->encode(s.get<std::string>());
      out["ids"].push_back(ids);
      out["decoded"].push_back(tok->decode(ids));
    }
    if (in.is_object() && in.contains("ids")) {
      out["decoded_ids"] = nlohmann::json::array();
      for (auto& ids : in["ids"]) out["decoded_ids"].push_back(tok->decode(ids.get<std::vector<int32_t>>()));
    }
    qf::fs::write_atomic(argv[3], out.dump());
  } catch (const std::exception& e) {
    std::cerr << "interop_tok: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
