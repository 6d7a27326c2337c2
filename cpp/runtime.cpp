#include "runtime.h"

#include <atomic>
#include <cstdio>
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

}  // namespace

void ensure_runtime() {
    static std::once_flag once;
    std::call_once(once, [] {
        llama_log_set(log_sink, nullptr);
        mtmd_log_set(log_sink, nullptr);
        mtmd_helper_log_set(log_sink, nullptr);
        llama_backend_init();
        watch_device_buffers();
    });
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

BuildInfo build_info() {
    ensure_runtime();
    BuildInfo info;
    info.llama_cpp_commit = LLAVA_KV_LLAMA_CPP_COMMIT;
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
