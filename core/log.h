// Minimal leveled logging to stderr with a timestamp; rank-aware later (only rank 0 prints info).
#pragma once
#include <string>

#include "core/error.h"

namespace qf::log {
void set_quiet(bool quiet);
bool quiet();
void info_line(const std::string& s);
void warn_line(const std::string& s);
template <class... A>
void info(const A&... a) { info_line(::qf::str(a...)); }
template <class... A>
void warn(const A&... a) { warn_line(::qf::str(a...)); }
}  // namespace qf::log
