#include "runtime.h"

#ifdef _WIN32
#ifndef NOMINMAX  // MinGW's libstdc++ defines it already
#define NOMINMAX
#endif
#include <windows.h>
#else
#include <dlfcn.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <mutex>
#include <stdexcept>

#include "device_ledger.h"
#include "ggml-backend.h"
#include "llama.h"
#include "mtmd-helper.h"
#include "mtmd.h"

#ifndef LLAVA_KV_LLAMA_CPP_COMMIT
#define LLAVA_KV_LLAMA_CPP_COMMIT "unknown"
#endif
#ifndef LLAVA_KV_CPU_VARIANTS
#define LLAVA_KV_CPU_VARIANTS "all"
#endif

namespace llava_kv {
namespace {

std::atomic<int> g_verbose{0};

constexpr size_t kMaxLoggedErrors = 4096;
thread_local std::string t_logged_errors;
thread_local ggml_log_level t_last_level = GGML_LOG_LEVEL_NONE;

void log_sink(ggml_log_level level, const char * text, void * /*user_data*/) {
    if (level != GGML_LOG_LEVEL_CONT) {
        t_last_level = level;
    }
    if (t_last_level == GGML_LOG_LEVEL_ERROR && t_logged_errors.size() < kMaxLoggedErrors) {
        t_logged_errors += text;
    }
    if (g_verbose.load(std::memory_order_relaxed) > 0) {
        std::fputs(text, stderr);
    }
}

const char * device_type_name(enum ggml_backend_dev_type type) {
    switch (type) {
        case GGML_BACKEND_DEVICE_TYPE_CPU: return "cpu";
        case GGML_BACKEND_DEVICE_TYPE_GPU: return "gpu";
        case GGML_BACKEND_DEVICE_TYPE_IGPU: return "igpu";
        default: return "accel";
    }
}

namespace fs = std::filesystem;

// How ggml names a backend module: libggml-cpu-zen4.so (ggml-cpu-zen4.dll on Windows).
#ifdef _WIN32
constexpr const char * kModulePrefix = "ggml-";
constexpr const char * kModuleExtension = ".dll";
#else
constexpr const char * kModulePrefix = "libggml-";
constexpr const char * kModuleExtension = ".so";
#endif

// The folder of the library this code is in (the Python module): ggml's backend modules lie beside it.
fs::path module_dir() {
#ifdef _WIN32
    HMODULE self = nullptr;
    wchar_t path[MAX_PATH];
    if (!GetModuleHandleExW(GET_MODULE_HANDLE_EX_FLAG_FROM_ADDRESS | GET_MODULE_HANDLE_EX_FLAG_UNCHANGED_REFCOUNT,
                            reinterpret_cast<LPCWSTR>(&ensure_runtime), &self) ||
        GetModuleFileNameW(self, path, MAX_PATH) == 0) {
        throw std::runtime_error("llava-kv: cannot tell where its native module is");
    }
    return fs::path(path).parent_path();
#else
    Dl_info info{};
    if (dladdr(reinterpret_cast<void *>(&ensure_runtime), &info) == 0 || info.dli_fname == nullptr) {
        throw std::runtime_error("llava-kv: cannot tell where its native module is (dladdr failed)");
    }
    return fs::path(info.dli_fname).parent_path();
#endif
}

// What a CPU variant module scores on this CPU (ggml_backend_score: 0 where the CPU lacks an
// instruction set it needs, higher for more capable variants), read without registering it.
int cpu_variant_score(const fs::path & path) {
    using score_fn = int (*)();
#ifdef _WIN32
    HMODULE lib = LoadLibraryW(path.wstring().c_str());
    if (lib == nullptr) {
        return 0;
    }
    auto score = reinterpret_cast<score_fn>(GetProcAddress(lib, "ggml_backend_score"));
    const int value = score != nullptr ? score() : 0;
    FreeLibrary(lib);
#else
    void * lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
        return 0;
    }
    auto score = reinterpret_cast<score_fn>(dlsym(lib, "ggml_backend_score"));
    const int value = score != nullptr ? score() : 0;
    dlclose(lib);
#endif
    return value;
}

std::string g_cpu_variant;                // the CPU backend variant loaded (set once, in ensure_runtime)
std::vector<std::string> g_cpu_variants;  // the variants this build has

// Registers the backends built beside the module: every other backend there (GPU ones register
// nothing where their driver is missing), then the CPU backend in the variant that scores best on
// this CPU, or in the one LLAVA_KV_CPU_VARIANT names (to compare logits across machines, or with a
// peer built for that variant). A build for its host alone has its backends linked in: "host".
// (Its llama.cpp is static in the module, so module_dir() holds no backend files either.)
void load_backends() {
    const char * forced = std::getenv("LLAVA_KV_CPU_VARIANT");
    if (std::string(LLAVA_KV_CPU_VARIANTS) == "host") {  // one CPU backend, linked in: nothing to load
        if (forced != nullptr && *forced != '\0' && std::string(forced) != "host") {
            throw std::runtime_error(std::string("LLAVA_KV_CPU_VARIANT=") + forced + ": this build has one CPU "
                                     "backend, built for its host (LLAVA_KV_CPU_VARIANTS=host): no variant to choose");
        }
        g_cpu_variant = "host";
        g_cpu_variants = {"host"};
        return;
    }
    const fs::path dir = module_dir();
    const std::string cpu_prefix = std::string(kModulePrefix) + "cpu";
    std::vector<fs::path> others;
    std::map<std::string, fs::path> cpu;
    for (const auto & entry : fs::directory_iterator(dir)) {
        const std::string name = entry.path().filename().string();
        const std::string stem = entry.path().stem().string();
        if (name.rfind(kModulePrefix, 0) != 0 || entry.path().extension() != kModuleExtension ||
            stem == std::string(kModulePrefix) + "base") {
            continue;
        }
        if (stem.rfind(cpu_prefix + "-", 0) == 0) {
            cpu[stem.substr(cpu_prefix.size() + 1)] = entry.path();
        } else {
            others.push_back(entry.path());
        }
    }
    std::string known;
    for (const auto & entry : cpu) {
        known += (known.empty() ? "" : ", ") + entry.first;
    }
    // Chosen and checked before anything is registered, so a refusal leaves nothing half loaded.
    std::string chosen;
    if (forced != nullptr && *forced != '\0') {
        if (cpu.count(forced) == 0) {
            throw std::runtime_error(std::string("LLAVA_KV_CPU_VARIANT=") + forced + ": this build has no such CPU "
                                     "variant; it has: " + known);
        }
        if (cpu_variant_score(cpu[forced]) == 0) {
            throw std::runtime_error(std::string("LLAVA_KV_CPU_VARIANT=") + forced + ": this CPU cannot run that "
                                     "variant (it lacks an instruction set the variant needs); this build has: " +
                                     known);
        }
        chosen = forced;
    } else {
        int best = 0;
        for (const auto & [variant, path] : cpu) {
            if (const int score = cpu_variant_score(path); score > best) {
                best = score;
                chosen = variant;
            }
        }
        if (chosen.empty()) {
            throw std::runtime_error("llava-kv: none of the CPU backend variants in " + dir.string() +
                                     " runs on this CPU (found: " + (known.empty() ? "none" : known) + ")");
        }
    }
    std::sort(others.begin(), others.end());
    for (const auto & path : others) {
        ggml_backend_load(path.string().c_str());  // a GPU backend whose driver is missing registers nothing
    }
    if (ggml_backend_load(cpu[chosen].string().c_str()) == nullptr) {
        throw std::runtime_error("llava-kv: could not load the CPU backend " + cpu[chosen].string());
    }
    for (const auto & entry : cpu) {
        g_cpu_variants.push_back(entry.first);
    }
    g_cpu_variant = chosen;
}

}  // namespace

void ensure_runtime() {
    static std::once_flag once;
    std::call_once(once, [] {
        llama_log_set(log_sink, nullptr);
        mtmd_log_set(log_sink, nullptr);
        mtmd_helper_log_set(log_sink, nullptr);
        load_backends();
        llama_backend_init();
        watch_device_buffers();
    });
}

const CpuThreadPoolApi & cpu_threadpool_api() {
    static const CpuThreadPoolApi api = [] {
        ensure_runtime();
        CpuThreadPoolApi out;
        ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        ggml_backend_reg_t reg = cpu != nullptr ? ggml_backend_dev_backend_reg(cpu) : nullptr;
        if (reg != nullptr) {
            out.create = reinterpret_cast<ggml_threadpool_t (*)(ggml_threadpool_params *)>(
                ggml_backend_reg_get_proc_address(reg, "ggml_threadpool_new"));
            out.destroy = reinterpret_cast<void (*)(ggml_threadpool_t)>(
                ggml_backend_reg_get_proc_address(reg, "ggml_threadpool_free"));
        }
        if (out.create == nullptr || out.destroy == nullptr) {
            return CpuThreadPoolApi{};
        }
        // The registry does not hand out ggml_threadpool_pause; the module that made `create` exports it.
#ifdef _WIN32
        HMODULE lib = nullptr;
        if (GetModuleHandleExA(GET_MODULE_HANDLE_EX_FLAG_FROM_ADDRESS | GET_MODULE_HANDLE_EX_FLAG_UNCHANGED_REFCOUNT,
                               reinterpret_cast<LPCSTR>(out.create), &lib)) {
            out.pause = reinterpret_cast<void (*)(ggml_threadpool_t)>(GetProcAddress(lib, "ggml_threadpool_pause"));
        }
#else
        Dl_info where{};
        if (dladdr(reinterpret_cast<void *>(out.create), &where) != 0 && where.dli_fname != nullptr) {
            if (void * lib = dlopen(where.dli_fname, RTLD_NOW | RTLD_NOLOAD)) {
                out.pause = reinterpret_cast<void (*)(ggml_threadpool_t)>(dlsym(lib, "ggml_threadpool_pause"));
                dlclose(lib);  // NOLOAD took a reference on the loaded module; it stays loaded
            }
        }
#endif
        return out;
    }();
    return api;
}

Verbosity::Verbosity(bool enabled) : enabled_(enabled) {
    if (enabled_) {
        g_verbose.fetch_add(1);
    }
}

Verbosity::~Verbosity() {
    if (enabled_) {
        g_verbose.fetch_sub(1);
    }
}

std::vector<DeviceInfo> devices() {
    ensure_runtime();
    std::map<std::string, size_t> allocated;
    for (const auto & entry : device_ledger()) {
        allocated[entry.device] += entry.bytes;
    }
    std::vector<DeviceInfo> out;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        DeviceInfo info;
        info.name = ggml_backend_dev_name(dev);
        info.description = ggml_backend_dev_description(dev);
        info.type = device_type_name(ggml_backend_dev_type(dev));
        ggml_backend_dev_memory(dev, &info.free, &info.total);
        info.allocated = allocated[info.name];
        out.push_back(std::move(info));
    }
    return out;
}

ggml_backend_dev_t device_by_name(const std::string & name) {
    ensure_runtime();
    if (ggml_backend_dev_t dev = ggml_backend_dev_by_name(name.c_str())) {
        return dev;
    }
    std::string known;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        known += std::string(known.empty() ? "" : ", ") + ggml_backend_dev_name(ggml_backend_dev_get(i));
    }
    throw std::invalid_argument("no device named '" + name + "'; this build sees: " + known);
}

std::string llama_cpp_commit() { return LLAVA_KV_LLAMA_CPP_COMMIT; }

std::string cpu_variant() {
    ensure_runtime();
    return g_cpu_variant;
}

BuildInfo build_info() {
    ensure_runtime();
    BuildInfo info;
    info.llama_cpp_commit = LLAVA_KV_LLAMA_CPP_COMMIT;
    info.cpu_variant = g_cpu_variant;
    info.cpu_variants = g_cpu_variants;
    info.cpu_variants_built = LLAVA_KV_CPU_VARIANTS;
    for (size_t i = 0; i < ggml_backend_reg_count(); ++i) {
        info.backends.emplace_back(ggml_backend_reg_name(ggml_backend_reg_get(i)));
    }
    info.devices = devices();
    return info;
}

std::string take_logged_errors() {
    std::string out;
    out.swap(t_logged_errors);
    while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) {
        out.pop_back();
    }
    return out;
}

}  // namespace llava_kv
