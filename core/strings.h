// Small string predicates shared across folders (header-only).
#pragma once
#include <string_view>

namespace qf {

inline bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace qf
