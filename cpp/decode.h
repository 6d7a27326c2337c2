// Writing text tokens and encoded images into a context's KV cache, split into batches the same way
// wherever it happens (a session's edit, a fresh run, the batch runner), because the splits decide
// whether two runs give bitwise the same logits.
#pragma once

#include <cstdint>
#include <string>

#include "embedding_cache.h"
#include "llama.h"
#include "mtmd.h"

namespace llava_kv {

// What one decode call did, for the callers' counters.
struct DecodeCounts {
    uint64_t calls = 0;  // llama_process calls (batches)
    uint64_t text_tokens = 0;
    uint64_t image_tokens = 0;
    bool logits = false;  // the last batch asked for the logits of its last token
};

// Decodes `n` tokens at positions pos, pos+1, ... into `seq`, n_batch at a time from the first (as
// mtmd_helper_eval_chunk_single splits a text chunk); with `logits_last` the last token's logits are
// requested. Returns llama_process's status (0: all decoded), -1 if a batch could not be filled.
int32_t decode_text(llama_context * ctx, const llama_token * tokens, size_t n, llama_pos pos, llama_seq_id seq,
                    int32_t n_batch, bool logits_last, DecodeCounts & counts);

// Decodes an encoded image (its marker text and image chunks) into `seq` from `pos`, which ends after
// it. With `logits_last`, the logits of a trailing text chunk (an end-of-image marker) are requested.
int32_t decode_image(mtmd_context * projector, llama_context * ctx, const ImageEmbedding & image, llama_pos & pos,
                     llama_seq_id seq, int32_t n_batch, bool logits_last, DecodeCounts & counts);

// Why `image` cannot be decoded in batches of `max_batch` tokens (empty if it can): a projector that
// attends over a whole image at once needs all of an image chunk's tokens in one batch.
std::string image_batch_problem(mtmd_context * projector, const ImageEmbedding & image, int32_t max_batch);

}  // namespace llava_kv
