#include "embedding_cache.h"

namespace llava_kv {

size_t MediaEmbedding::bytes() const {
    size_t total = sizeof(*this) + digest.size();
    for (const auto & e : embeddings) {
        total += e.size() * sizeof(float);
    }
    return total;
}

EmbeddingCache::EmbeddingCache(size_t capacity_bytes) : capacity_bytes_(capacity_bytes) {}

std::shared_ptr<const MediaEmbedding> EmbeddingCache::get(const std::string & digest) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = index_.find(digest);
    if (it == index_.end()) {
        ++misses_;
        return nullptr;
    }
    ++hits_;
    lru_.splice(lru_.begin(), lru_, it->second);
    return *it->second;
}

std::shared_ptr<const MediaEmbedding> EmbeddingCache::peek(const std::string & digest) const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = index_.find(digest);
    return it == index_.end() ? nullptr : *it->second;
}

void EmbeddingCache::put(std::shared_ptr<const MediaEmbedding> entry) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = index_.find(entry->digest);
    if (it != index_.end()) {
        bytes_ -= (*it->second)->bytes();
        lru_.erase(it->second);
        index_.erase(it);
    }
    if (entry->bytes() > capacity_bytes_) {
        return;
    }
    bytes_ += entry->bytes();
    const std::string digest = entry->digest;
    lru_.push_front(std::move(entry));
    index_[digest] = lru_.begin();
    evict_locked();
}

void EmbeddingCache::clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    lru_.clear();
    index_.clear();
    bytes_ = 0;
}

void EmbeddingCache::set_capacity(size_t capacity_bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    capacity_bytes_ = capacity_bytes;
    evict_locked();
}

void EmbeddingCache::evict_locked() {
    while (bytes_ > capacity_bytes_ && !lru_.empty()) {
        const auto & victim = lru_.back();
        bytes_ -= victim->bytes();
        index_.erase(victim->digest);
        lru_.pop_back();
        ++evictions_;
    }
}

EmbeddingCacheStats EmbeddingCache::stats() const {
    std::lock_guard<std::mutex> lock(mutex_);
    EmbeddingCacheStats s;
    s.hits = hits_;
    s.misses = misses_;
    s.evictions = evictions_;
    s.entries = lru_.size();
    s.bytes = bytes_;
    s.capacity_bytes = capacity_bytes_;
    return s;
}

}  // namespace llava_kv
