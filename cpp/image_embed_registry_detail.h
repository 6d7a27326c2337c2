// What the exact edits (image_embed_registry.cpp) and the approximate ones
// (image_embed_registry_approx.cpp) of ImageEmbedRegistry share; not for other files.
#pragma once

#include "decode.h"
#include "image_embed_registry.h"
#include "mtmd.h"

namespace llava_kv::registry_detail {

// Marks a rollback in progress for its lifetime, so that a pending cancel() cannot stop it.
class Restoring {
  public:
    explicit Restoring(CancelState & state) : state_(state) { state_.restoring.store(true); }
    ~Restoring() { state_.restoring.store(false); }
    Restoring(const Restoring &) = delete;
    Restoring & operator=(const Restoring &) = delete;

  private:
    CancelState & state_;
};

// The token whose logits a timeline ending in `chunk` reports, if it ends in text.
inline bool last_text_token(const Chunk & chunk, llama_token bos, llama_token & out) {
    if (chunk.kind == ChunkKind::Text) {
        if (!chunk.tokens.empty()) {
            out = chunk.tokens.back();
            return true;
        }
        if (chunk.bos) {
            out = bos;
            return true;
        }
        return false;
    }
    const auto & last = chunk.media->chunks.back();
    if (mtmd_input_chunk_get_type(last.get()) != MTMD_INPUT_CHUNK_TYPE_TEXT) {
        return false;
    }
    size_t n = 0;
    const llama_token * tokens = mtmd_input_chunk_get_tokens_text(last.get(), &n);
    if (n == 0) {
        return false;
    }
    out = tokens[n - 1];
    return true;
}

}  // namespace llava_kv::registry_detail
