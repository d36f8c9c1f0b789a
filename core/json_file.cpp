#include "core/json_file.h"

#include <cctype>

#include "core/fs.h"

namespace qf::json_file {
namespace {

bool all_digits(const std::string& s) {
  if (s.empty()) return false;
  for (unsigned char c : s)
    if (!std::isdigit(c)) return false;
  return true;
}

// "/a/0/b~1c" -> "a[0].b/c" (array indices in brackets, RFC 6901 escapes undone).
std::string key_path(const std::string& pointer) {
  std::string out;
  size_t i = 0;
  while (i < pointer.size() && pointer[i] == '/') {
    const size_t e = std::min(pointer.find('/', i + 1), pointer.size());
    std::string tok;
    for (size_t k = i + 1; k < e; ++k) {
      if (pointer[k] == '~' && k + 1 < e && (pointer[k + 1] == '0' || pointer[k + 1] == '1')) {
        tok += pointer[++k] == '0' ? '~' : '/';
      } else {
        tok += pointer[k];
      }
    }
    if (all_digits(tok)) {
      out += "[" + tok + "]";
    } else {
      out += (out.empty() ? "" : ".") + tok;
    }
    i = e;
  }
  return out;
}

// "string" -> "a string", "object" -> "an object", "null" -> "null".
std::string a(const std::string& type) {
  if (type == "null") return type;
  return (type.find_first_of("aeiou") == 0 ? "an " : "a ") + type;
}

}  // namespace

std::string describe(const nlohmann::json::exception& e) {
  std::string m = e.what();
  if (m.rfind("[json.exception.", 0) == 0) {
    const size_t p = m.find("] ");
    if (p != std::string::npos) m.erase(0, p + 2);
  }
  std::string where;
  if (!m.empty() && m[0] == '(') {  // JSON_DIAGNOSTICS: "(/a/0/b) " names the offending value
    const size_t p = m.find(") ");
    if (p != std::string::npos) {
      where = key_path(m.substr(1, p - 1));
      m.erase(0, p + 2);
    }
  }
  static const std::string must = "type must be ", but = ", but is ";
  static const std::string cannot = "cannot use ", with = " with ";
  if (m.rfind(must, 0) == 0 && m.find(but) != std::string::npos) {
    const size_t b = m.find(but);
    m = "expected " + a(m.substr(must.size(), b - must.size())) + ", found " + a(m.substr(b + but.size()));
  } else if (m.rfind(cannot, 0) == 0 && m.rfind(with) != std::string::npos) {
    const std::string found = m.substr(m.rfind(with) + with.size());
    const bool index = m.find("numeric argument") != std::string::npos;
    m = str("expected ", index ? "an array" : "an object", ", found ", a(found));
  } else if (m.rfind("key '", 0) == 0 && m.size() > 11 && m.compare(m.size() - 11, 11, "' not found") == 0) {
    m = "missing " + m;
    m.erase(m.size() - 10);  // "missing key 'k'"
  } else if (m.rfind("parse error at ", 0) == 0) {
    m.erase(0, 15);
  } else if (m.rfind("parse error: ", 0) == 0) {
    m.erase(0, 13);
  }
  return where.empty() ? m : "'" + where + "': " + m;
}

nlohmann::json parse(const std::string& text, const std::string& origin) {
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw InputError(origin + ": not valid JSON (" + describe(e) + ")");
  }
}

nlohmann::json read(const std::string& path) { return parse(fs::read_file(path), path); }

}  // namespace qf::json_file
