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
    int64_t approx_from = -1;  // first chunk with approximate KV (blend/shift edits); -1: exact
};

// What a state blob says about itself, covered by its checksum: enough to size the context that
// loads it, and to refuse a blob of another model before anything is allocated.
struct StateHeader {
    uint32_t n_ctx = 0;
    uint32_t n_batch = 0;
    uint32_t n_ubatch = 0;
    uint32_t n_cells = 0;  // KV cells the timeline takes (BOS included)
    uint32_t n_vocab = 0;
    uint32_t n_embd_inp = 0;
};

// Layout: magic "LLKVST02", payload size (u64), checksum of the payload (u64), payload (header,
// timeline, logits, KV cache of the sequence).
std::string serialize_state(const StateHeader & header, const RegistrySnapshot & snapshot,
                            const std::string & kv_state);
// Checks magic, size and checksum (no allocation beyond the blob) and returns the header. Throws
// Error naming what is wrong.
StateHeader inspect_state(const std::string & blob);
// Test hook: rewrites the payload size and checksum of a blob a test changed on purpose.
std::string reseal_state(std::string blob);
// Throws Error on a truncated or corrupt blob; every size is bounded by the blob.
RegistrySnapshot deserialize_state(const std::string & blob, StateHeader & header, std::string & kv_state);

}  // namespace llava_kv
