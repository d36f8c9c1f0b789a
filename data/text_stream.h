// Streaming detokenization: token ids in, printable text out, as they are generated.
// Invariant: every string push() and finish() return is valid UTF-8, and their concatenation is
// the sanitized decode of all ids (special/control tokens - BOS, EOS, PAD, control pieces - and ids
// beyond the tokenizer's vocabulary (a model's padding rows) left out). A code point whose bytes are split over several tokens (byte-level BPE, byte fallback) is
// held back until it is complete; bytes that can never form one become U+FFFD, and finish()
// flushes an unfinished tail as U+FFFD (what Python's errors="replace" does).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace qf::data {

// Splits `bytes` into (valid UTF-8 with invalid sequences replaced by U+FFFD, the trailing bytes of
// an incomplete but so far valid sequence). With `final`, that tail is replaced too.
std::string utf8_sanitize(const std::string& bytes, std::string* tail = nullptr);

class TextStream {
 public:
  // `context`: ids decoded together with the new ones (e.g. the prompt, whose text is returned by
  // the first push() or finish()); they go through the same special-token filter.
  TextStream(const Tokenizer& tok, const std::vector<int32_t>& context = {});
  std::string push(int32_t id);  // the text that became printable with this token ("" if none)
  std::string finish();          // whatever remains, incomplete sequences as U+FFFD

 private:
  bool special(int32_t id) const;
  std::string take(bool final);
  const Tokenizer& tok_;
  std::vector<int32_t> ids_;
  std::string emitted_;  // text returned so far
};

}  // namespace qf::data
