#include "live_objects.h"

#include <atomic>

namespace llava_kv {
namespace {

std::atomic<long> g_live[3];

std::atomic<long> & counter(LiveKind kind) { return g_live[static_cast<int>(kind)]; }

}  // namespace

LiveObject::LiveObject(LiveKind kind) : kind_(kind) { counter(kind_).fetch_add(1); }

LiveObject::~LiveObject() { counter(kind_).fetch_sub(1); }

LiveCounts live_counts() {
    return {counter(LiveKind::Model).load(), counter(LiveKind::Session).load(),
            counter(LiveKind::BatchRunner).load()};
}

}  // namespace llava_kv
