// Content-addressed store of projector outputs, shared by every session of one model.
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "chunk_kind.h"
#include "llama.h"
#include "mtmd.h"

namespace llava_kv {

// What one image or audio clip becomes once the projector has seen it: the mtmd chunks it is decoded as (image
// chunks kept as pixel-free placeholders, plus any begin/end marker text the projector adds) and the
// embedding of each image chunk. Immutable once built; sessions hold it by shared_ptr, so eviction
// from the cache never pulls an embedding from under a timeline that still uses it.
struct MediaEmbedding {
    std::string digest;
    std::vector<mtmd::input_chunk_ptr> chunks;
    std::vector<std::vector<float>> embeddings;  // one per chunk; empty for text chunks
    int32_t n_tokens = 0;                        // tokens decoded into the KV cache
    llama_pos n_pos = 0;                         // KV positions taken (differs from n_tokens under M-RoPE)
    uint32_t width = 0;
    uint32_t height = 0;
    ChunkKind kind = ChunkKind::Image;  // Image, or Audio (then width/height are 0)
    uint64_t n_samples = 0;  // audio

    size_t bytes() const;
};

struct EmbeddingCacheStats {
    uint64_t hits = 0;
    uint64_t misses = 0;
    uint64_t evictions = 0;
    size_t entries = 0;
    size_t bytes = 0;
    size_t capacity_bytes = 0;
};

// LRU under a byte budget; thread-safe. An entry larger than the whole budget is not kept.
class EmbeddingCache {
  public:
    explicit EmbeddingCache(size_t capacity_bytes);

    std::shared_ptr<const MediaEmbedding> get(const std::string & digest);
    // Looks up without touching hit/miss counters or LRU order.
    std::shared_ptr<const MediaEmbedding> peek(const std::string & digest) const;
    void put(std::shared_ptr<const MediaEmbedding> entry);
    void clear();
    void set_capacity(size_t capacity_bytes);
    EmbeddingCacheStats stats() const;

  private:
    void evict_locked();

    using LruList = std::list<std::shared_ptr<const MediaEmbedding>>;
    mutable std::mutex mutex_;
    LruList lru_;  // front = most recently used
    std::unordered_map<std::string, LruList::iterator> index_;
    size_t capacity_bytes_;
    size_t bytes_ = 0;
    uint64_t hits_ = 0;
    uint64_t misses_ = 0;
    uint64_t evictions_ = 0;
};

}  // namespace llava_kv
