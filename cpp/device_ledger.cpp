#include "device_ledger.h"

#include <map>
#include <mutex>
#include <tuple>
#include <unordered_map>

#include "ggml-backend-impl.h"  // the buffer type and buffer interfaces the ledger wraps
#include "ggml-backend.h"

namespace llava_kv {
namespace {

using AllocFn = ggml_backend_buffer_t (*)(ggml_backend_buffer_type_t, size_t);
using FreeFn = void (*)(ggml_backend_buffer_t);

struct LiveBuffer {
    std::string device;
    const char * owner = nullptr;
    uint64_t session_id = 0;
    FreeFn free_buffer = nullptr;  // the backend's own, called after the record is dropped
};

struct Ledger {
    std::mutex mutex;
    std::unordered_map<ggml_backend_buffer_type_t, AllocFn> alloc_of;  // wrapped type -> its own alloc
    std::unordered_map<ggml_backend_buffer_t, LiveBuffer> live;
};

// Never destroyed: buffers may be freed by static destructors of the backends after ours have run.
Ledger & ledger() {
    static Ledger * instance = new Ledger();
    return *instance;
}

thread_local const char * t_owner = nullptr;
thread_local uint64_t t_session = 0;

std::string device_of(ggml_backend_buffer_type_t buft) {
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
    if (dev == nullptr || ggml_backend_buft_is_host(buft)) {
        return "CPU";
    }
    return ggml_backend_dev_name(dev);
}

void free_watched(ggml_backend_buffer_t buffer) {
    FreeFn own = nullptr;
    {
        Ledger & l = ledger();
        std::lock_guard<std::mutex> lock(l.mutex);
        auto it = l.live.find(buffer);
        if (it != l.live.end()) {
            own = it->second.free_buffer;
            l.live.erase(it);
        }
    }
    if (own != nullptr) {
        own(buffer);
    }
}

ggml_backend_buffer_t alloc_watched(ggml_backend_buffer_type_t buft, size_t size) {
    AllocFn own = nullptr;
    {
        Ledger & l = ledger();
        std::lock_guard<std::mutex> lock(l.mutex);
        own = l.alloc_of.at(buft);
    }
    ggml_backend_buffer_t buffer = own(buft, size);
    if (buffer == nullptr) {
        return nullptr;
    }
    Ledger & l = ledger();
    std::lock_guard<std::mutex> lock(l.mutex);
    // A type whose alloc falls back to another watched type (Vulkan's pinned host memory falls back to
    // the CPU's) returns a buffer that is booked already.
    if (l.live.count(buffer) == 0) {
        l.live[buffer] = {device_of(buft), t_owner, t_session, buffer->iface.free_buffer};
        buffer->iface.free_buffer = free_watched;
    }
    return buffer;
}

void watch(ggml_backend_buffer_type_t buft) {
    if (buft == nullptr || buft->iface.alloc_buffer == nullptr || buft->iface.alloc_buffer == alloc_watched) {
        return;
    }
    Ledger & l = ledger();
    std::lock_guard<std::mutex> lock(l.mutex);
    l.alloc_of[buft] = buft->iface.alloc_buffer;
    buft->iface.alloc_buffer = alloc_watched;
}

const char * component_of(const char * owner, ggml_backend_buffer_usage usage) {
    if (owner != nullptr && std::string(owner) != "session") {
        return owner;
    }
    switch (usage) {
        case GGML_BACKEND_BUFFER_USAGE_COMPUTE: return "compute";
        case GGML_BACKEND_BUFFER_USAGE_WEIGHTS: return owner == nullptr ? "weights" : "other";
        default: return owner == nullptr ? "other" : "kv";
    }
}

}  // namespace

void watch_device_buffers() {
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        watch(ggml_backend_dev_buffer_type(dev));
        watch(ggml_backend_dev_host_buffer_type(dev));
    }
}

std::vector<LedgerEntry> device_ledger() {
    std::map<std::tuple<std::string, std::string, uint64_t>, LedgerEntry> sums;
    Ledger & l = ledger();
    std::lock_guard<std::mutex> lock(l.mutex);
    for (const auto & [buffer, info] : l.live) {
        const std::string component = component_of(info.owner, buffer->usage);
        LedgerEntry & e = sums[{info.device, component, info.session_id}];
        e.device = info.device;
        e.component = component;
        e.session_id = info.session_id;
        e.bytes += buffer->size;
        e.buffers += 1;
    }
    std::vector<LedgerEntry> out;
    for (auto & [key, entry] : sums) {
        out.push_back(std::move(entry));
    }
    return out;
}

LedgerOwner::LedgerOwner(const char * owner, uint64_t session_id)
    : previous_owner_(t_owner), previous_session_(t_session) {
    t_owner = owner;
    t_session = session_id;
}

LedgerOwner::~LedgerOwner() {
    t_owner = previous_owner_;
    t_session = previous_session_;
}

}  // namespace llava_kv
