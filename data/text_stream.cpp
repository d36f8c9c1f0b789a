#include "data/text_stream.h"

#include "data/utf8.h"

namespace qf::data {
namespace {

const std::string kReplacement = "\xEF\xBF\xBD";  // U+FFFD

bool cont(unsigned char b) { return (b & 0xC0) == 0x80; }

}  // namespace

std::string utf8_sanitize(const std::string& s, std::string* tail) {
  std::string out;
  out.reserve(s.size());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char b = s[i];
    if (b < 0x80) {
      out += static_cast<char>(b);
      ++i;
      continue;
    }
    // Lead byte: how many continuation bytes follow, and the allowed range of the first one.
    const auto [need, lo, hi] = utf8_lead(b);
    if (need == 0) {  // a stray continuation byte or a byte no UTF-8 text holds
      out += kReplacement;
      ++i;
      continue;
    }
    size_t j = i + 1;
    bool bad = false;
    for (int k = 0; k < need; ++k, ++j) {
      if (j >= n) break;
      const unsigned char c = s[j];
      const bool ok = k == 0 ? (c >= lo && c <= hi) : cont(c);
      if (!ok) {
        bad = true;
        break;
      }
    }
    if (!bad && j - i == static_cast<size_t>(need) + 1) {
      out.append(s, i, j - i);
    } else if (!bad && j >= n && tail) {  // a valid start cut off by the end: maybe completed later
      *tail = s.substr(i);
      return out;
    } else {
      out += kReplacement;  // the maximal ill-formed subpart becomes one U+FFFD
    }
    i = j;
  }
  if (tail) tail->clear();
  return out;
}

TextStream::TextStream(const Tokenizer& tok, const std::vector<int32_t>& context) : tok_(tok) {
  for (int32_t id : context)
    if (!special(id)) ids_.push_back(id);
}

bool TextStream::special(int32_t id) const {
  if (id == tok_.eos_id() || id == tok_.bos_id() || id == tok_.pad_id()) return true;
  // A model may have more embedding rows than its tokenizer has tokens (padded vocabularies):
  // such ids have no text, as `tokenizers` decodes them.
  if (id < 0 || id >= tok_.vocab_size()) return true;
  return tok_.entry(id).type == 3;  // control
}

std::string TextStream::take(bool final) {
  std::string tail;
  std::string text = utf8_sanitize(tok_.decode(ids_), final ? nullptr : &tail);
  if (!final) {
    // A decoder that maps a partial byte sequence to U+FFFD (sentencepiece's byte fallback) fixes it
    // once the rest arrives: hold trailing replacement characters back until then.
    while (text.size() >= kReplacement.size() &&
           text.compare(text.size() - kReplacement.size(), kReplacement.size(), kReplacement) == 0)
      text.resize(text.size() - kReplacement.size());
  }
  if (text.size() >= emitted_.size() && text.compare(0, emitted_.size(), emitted_) == 0) {
    std::string out = text.substr(emitted_.size());
    emitted_ = std::move(text);
    return out;
  }
  if (!final) return "";  // the decoded prefix changed (resolved later): wait
  // Final and the text no longer extends what was printed: continue after the common prefix, at a
  // code point boundary.
  size_t k = 0;
  while (k < text.size() && k < emitted_.size() && text[k] == emitted_[k]) ++k;
  while (k > 0 && cont(static_cast<unsigned char>(text[k]))) --k;
  std::string out = text.substr(k);
  emitted_ = std::move(text);
  return out;
}

std::string TextStream::push(int32_t id) {
  if (special(id)) return "";
  ids_.push_back(id);
  return take(false);
}

std::string TextStream::finish() { return take(true); }

}  // namespace qf::data
