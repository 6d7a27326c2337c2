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
// loads it, to refuse a blob of another model before anything is allocated, and what it was written
// with: KV cells written by another llama.cpp, KV type, placement or CPU kernels are not the ones a
// fresh run here would compute (empty in a blob of format 02/03, which did not record them).
struct StateHeader {
    uint32_t n_ctx = 0;
    uint32_t n_batch = 0;
    uint32_t n_ubatch = 0;
    uint32_t n_cells = 0;  // KV cells the timeline takes (BOS included)
    uint32_t n_vocab = 0;
    uint32_t n_embd_inp = 0;
    std::string llama_cpp_commit;  // the llama.cpp the native core was built on
    std::string kv_type;           // the KV cache's element types: "f16", or K/V ("q8_0/f16")
    std::string placement;         // where the layers (and their KV) ran: "CPU", "Vulkan0", "CUDA0+CPU"
    std::string cpu_variant;       // ggml's CPU kernels ("zen4", "haswell"; "host")
};

// Layout: magic "LLKVST04", payload size (u64), checksum of the payload (u64), payload (header,
// timeline, logits, first approximate chunk, KV cache of the sequence). 02 and 03 are still read.
std::string serialize_state(const StateHeader & header, const RegistrySnapshot & snapshot,
                            const std::string & kv_state);
// Checks magic, size and checksum (no allocation beyond the blob) and returns the header. Throws
// Error naming what is wrong.
StateHeader inspect_state(const std::string & blob);
// What differs between how a state was written (`saved`) and how it would be computed now
// (`here`), in words ("" when nothing does, so the loaded KV cache equals a fresh run's); a state
// of format 02/03 recorded none of it, which is a difference too.
std::string provenance_difference(const StateHeader & saved, const StateHeader & here);
// Test hook: rewrites the payload size and checksum of a blob a test changed on purpose.
std::string reseal_state(std::string blob);
// Throws Error on a truncated or corrupt blob; every size is bounded by the blob.
RegistrySnapshot deserialize_state(const std::string & blob, StateHeader & header, std::string & kv_state);

}  // namespace llava_kv
