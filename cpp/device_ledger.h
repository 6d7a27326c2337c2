// Our own account of the memory the ggml backends hold on each device, kept at the allocator.
//
// llama.cpp reports what a model or a context says it holds; the driver reports what the whole device
// (or, on Mesa's lavapipe, the whole machine) has free. Neither can show a buffer that outlived the
// object that made it, which is the bug this project was started over (a binding's close() left the
// projector's VRAM allocated). The ledger sits where every buffer is born and dies: each device's
// buffer types get their alloc_buffer wrapped, each buffer so made gets its free_buffer wrapped, and
// every live buffer is booked to the owner that was current on the allocating thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace llava_kv {

// Live buffers of one owner on one device.
struct LedgerEntry {
    std::string device;     // ggml device name: "Vulkan0", "CUDA0", "CPU"
    std::string component;  // "weights", "projector", "kv", "compute", or "other" (no owner was set)
    uint64_t session_id = 0;  // the session a "kv" / "compute" entry belongs to (0: none)
    size_t bytes = 0;
    size_t buffers = 0;
};

// Wraps the buffer types of every device ggml knows (idempotent: a buffer type already wrapped is
// left alone). Called after the backends are initialised and before each model load.
void watch_device_buffers();

// The live buffers now, summed per (device, component, session). Host-memory buffer types of a device
// (pinned staging memory) are booked to "CPU".
std::vector<LedgerEntry> device_ledger();

// While alive, buffers allocated on this thread are booked to `owner` ("weights", "projector",
// "session"; a session's buffers are told apart as "kv" or "compute" by their ggml usage). Nests.
class LedgerOwner {
  public:
    explicit LedgerOwner(const char * owner, uint64_t session_id = 0);
    ~LedgerOwner();
    LedgerOwner(const LedgerOwner &) = delete;
    LedgerOwner & operator=(const LedgerOwner &) = delete;

  private:
    const char * previous_owner_;
    uint64_t previous_session_;
};

}  // namespace llava_kv
