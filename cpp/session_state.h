// A session's whole state as bytes: timeline (text tokens, image layouts and embeddings), last
// logits and the KV cache of its sequence. Used by save/load and fork.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "image_embed_registry.h"

namespace llava_kv {

struct RegistrySnapshot {
    std::vector<Chunk> timeline;
    uint64_t next_id = 1;
    std::vector<float> logits;
    bool has_logits = false;
};

std::string serialize_state(const RegistrySnapshot & snapshot, const std::string & kv_state);
// Throws Error on a truncated or corrupt blob.
RegistrySnapshot deserialize_state(const std::string & blob, std::string & kv_state);

}  // namespace llava_kv
