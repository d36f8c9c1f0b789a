// Error types for qforge. Invariant: user/config/input errors are thrown as qf::Error (or a
// subclass) whose message names the file/key/value and what was expected; library code never
// exits. apps/ maps ConfigError to exit code 2, trainer::DivergedError to 3, trainer::QualityGateError
// (a missed eval.gate) to 4 and every other Error to exit code 1.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace qf {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A set of configuration problems, all reported together (one line each, with full key paths).
struct ConfigError : Error {
  explicit ConfigError(std::vector<std::string> problems);
  std::vector<std::string> problems;
};

// Input data problems (corpus, tokenizer file, checkpoint) that name the offending file.
struct InputError : Error {
  using Error::Error;
};

namespace detail {
inline void cat(std::ostringstream&) {}
template <class T, class... R>
void cat(std::ostringstream& o, const T& t, const R&... r) {
  o << t;
  cat(o, r...);
}
}  // namespace detail

// The first line of a message (c10d's exceptions append a C++ stack trace after it).
inline std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

template <class... A>
std::string str(const A&... a) {
  std::ostringstream o;
  detail::cat(o, a...);
  return o.str();
}

}  // namespace qf

// QF_CHECK(cond, parts...): throws qf::Error with the concatenated message when cond is false.
#define QF_CHECK(cond, ...)                             \
  do {                                                  \
    if (!(cond)) throw ::qf::Error(::qf::str(__VA_ARGS__)); \
  } while (0)
#define QF_CHECK_INPUT(cond, ...)                            \
  do {                                                       \
    if (!(cond)) throw ::qf::InputError(::qf::str(__VA_ARGS__)); \
  } while (0)
