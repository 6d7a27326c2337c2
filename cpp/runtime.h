// Process-wide llama.cpp state: backend initialisation, the log sink, and build information.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "ggml-backend.h"

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

// One backend device, the same record everywhere (devices(), build_info(), Model::memory()).
struct DeviceInfo {
    std::string name;         // "CPU", "Vulkan0", "CUDA0"
    std::string description;  // what the driver calls it
    std::string type;         // "cpu", "gpu", "igpu" (integrated), "accel" (e.g. BLAS, NPU)
    size_t free = 0;          // bytes, as the driver reports them (free == total where it cannot tell)
    size_t total = 0;
    size_t allocated = 0;     // bytes of this process's live ggml buffers there (the device ledger)
};

struct BuildInfo {
    std::string version;
    std::string llama_cpp_commit;
    std::vector<std::string> backends;
    std::vector<DeviceInfo> devices;
    std::string cpu_variant;                // the CPU backend variant in use ("zen4", "haswell"; "host")
    std::vector<std::string> cpu_variants;  // the variants this build has
    std::string cpu_variants_built;         // "all" (portable) or "host" (built for the build machine)
};

BuildInfo build_info();

// ggml's CPU thread pool, as the loaded CPU backend module exports it (null functions where it has
// none). llama.cpp is built without OpenMP: each context computes on a pool of its own, whose
// workers meet at spinning barriers inside a graph and sleep between graphs.
struct CpuThreadPoolApi {
    ggml_threadpool_t (*create)(ggml_threadpool_params * params) = nullptr;
    void (*destroy)(ggml_threadpool_t pool) = nullptr;
    // Sends the workers to sleep now instead of after their poll (ggml resumes them at the next graph);
    // only with no graph in flight on the pool. Null where the module does not export it.
    void (*pause)(ggml_threadpool_t pool) = nullptr;
};
const CpuThreadPoolApi & cpu_threadpool_api();
// The llama.cpp commit the core was built on, and ggml's CPU kernels in use ("zen4", "host").
std::string llama_cpp_commit();
std::string cpu_variant();

// The llama.cpp / mtmd error lines logged on this thread since the last call (at most a few KB),
// so a failed load can say why even when logging is silent.
std::string take_logged_errors();
std::vector<DeviceInfo> devices();
// The device called `name` ("Vulkan0"); invalid_argument naming the devices there are otherwise.
ggml_backend_dev_t device_by_name(const std::string & name);

}  // namespace llava_kv
