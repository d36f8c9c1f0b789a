// JSON documents the user supplies (adapter_config.json, tokenizer.json, tokenizer_config.json,
// config.json, trainer_state.json, JSONL records). Invariant: every problem such a document can
// provoke reaches the user as qf::InputError "<file>: '<key path>': <what was expected, what was
// found>", never as nlohmann's raw "[json.exception.type_error.302] type must be string, but is
// number". The project compiles with JSON_DIAGNOSTICS=1 (every target, one ABI), so a type error
// raised on a value inside a parsed document carries that value's JSON pointer; a value copied out
// of its document loses it, so interpret documents through references.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

#include "core/error.h"

namespace qf::json_file {

// `text` parsed; a syntax error is InputError "<origin>: not valid JSON (line L, column C: ...)".
nlohmann::json parse(const std::string& text, const std::string& origin);
// The file at `path` (fs::read_file) parsed as by parse().
nlohmann::json read(const std::string& path);

// nlohmann's message in the user's terms: the "[json.exception.<kind>.<id>] " prefix dropped, the
// JSON pointer made a quoted key path, the type complaint made "expected ..., found ...":
//   "[json.exception.type_error.302] (/added_tokens/0/id) type must be number, but is string"
//   -> "'added_tokens[0].id': expected a number, found a string".
std::string describe(const nlohmann::json::exception& e);

// Runs `f`, which interprets a document read from `origin`; a json::exception it throws becomes
// InputError "<origin>: <describe(e)>" (qf::Error and everything else pass through unchanged).
template <class F>
auto interpret(const std::string& origin, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const nlohmann::json::exception& e) {
    throw InputError(origin + ": " + describe(e));
  }
}

}  // namespace qf::json_file
