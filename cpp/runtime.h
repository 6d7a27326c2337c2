// Process-wide llama.cpp state: backend initialisation, the log sink, and build information.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace llava_kv {

// Initialises the ggml backends once per process and installs our log sink (silent by default).
void ensure_runtime();

// While at least one Verbosity is alive, llama.cpp / mtmd logs go to stderr; otherwise nowhere.
// The sink writes with fprintf and never touches Python, so it is safe at interpreter exit.
class Verbosity {
  public:
    explicit Verbosity(bool enabled);
    ~Verbosity();
    Verbosity(const Verbosity &) = delete;
    Verbosity & operator=(const Verbosity &) = delete;

  private:
    bool enabled_;
};

struct DeviceInfo {
    std::string name;
    std::string description;
    std::string type;  // "cpu", "gpu", "igpu", "accel"
    size_t memory_free = 0;
    size_t memory_total = 0;
};

struct BuildInfo {
    std::string version;
    std::string llama_cpp_commit;
    std::vector<std::string> backends;
    std::vector<DeviceInfo> devices;
};

BuildInfo build_info();

// The llama.cpp / mtmd error lines logged on this thread since the last call (at most a few KB),
// so a failed load can say why even when logging is silent.
std::string take_logged_errors();
std::vector<DeviceInfo> devices();

}  // namespace llava_kv
