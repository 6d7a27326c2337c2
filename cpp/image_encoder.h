// Pixels -> embeddings for one model: the embedding cache first, the projector for what it lacks.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "embedding_cache.h"

namespace llava_kv {

class Model;

// RGB pixels owned by the caller for the length of the call, with their content digest.
struct ImagePixels {
    const uint8_t * data = nullptr;
    uint32_t width = 0;
    uint32_t height = 0;
    std::string digest;
    std::string source;
};

// What embedding images cost, added to by every call.
struct EncodeCounters {
    uint64_t images_encoded = 0;
    uint64_t embed_cache_hits = 0;
    uint64_t embed_cache_misses = 0;
    uint64_t batched_encodes = 0;  // projector calls that encoded several images at once
};

// Embeddings for these images, in order, from the model's cache or its projector. Images not yet
// cached are encoded under the projector lock, several at a time with mtmd's batch encode where
// the projector can; the same picture twice is encoded once. The caller holds the model.
// Throws ImageError naming the image that failed; nothing is added to the cache then.
std::vector<std::shared_ptr<const ImageEmbedding>> embed_images(Model & model,
                                                                const std::vector<const ImagePixels *> & images,
                                                                EncodeCounters & counters);

}  // namespace llava_kv
