// Fault injection for crash-safety tests. Code that writes durable state calls fault("<point>",
// <path>) after each step whose interruption must be survivable (a file fsynced, a rename done, a
// staged directory complete). A test either installs a hook (a throw from it leaves the disk as a
// kill at that point would) or sets QFORGE_FAULT=<point> / QFORGE_FAULT=<point>:<suffix> to have the
// process SIGKILL itself at the first such point (whose path ends with <suffix>, when given).
// Points: checkpoint saves (trainer/checkpoint.h lists them), "file_synced" / "file_renamed" (every
// fs::AtomicWriter commit), "export_staged" / "export_old_aside" / "export_committed" (every staged
// export or quantize output, exporter::write_staged_dir).
#pragma once
#include <functional>
#include <string>

namespace qf {

void fault(const char* point, const std::string& path = "");
// Test hook, called with every point reached; nullptr removes it.
void set_fault_hook(std::function<void(const char* point)> hook);

}  // namespace qf
