// Pixels or audio samples -> embeddings for one model: the embedding cache first, the projector for
// what it lacks.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "embedding_cache.h"
#include "model.h"
#include "mtmd.h"

namespace llava_kv {

// An image (RGB pixels) or an audio clip (mono float samples at the projector's rate), owned by the
// caller for the length of the call, with its content digest.
struct MediaInput {
    const uint8_t * data = nullptr;  // image: height x width x 3
    uint32_t width = 0;
    uint32_t height = 0;
    std::string digest;
    std::string source;
    const float * samples = nullptr;  // audio (then data is null)
    size_t n_samples = 0;

    bool is_audio() const { return samples != nullptr; }
};

// Throws the MediaError of the input's kind (AudioError for a clip, ImageError for an image), so a
// caller catching one kind never mistakes the other for it.
[[noreturn]] void throw_media_error(const MediaInput & input, const std::string & what);

// What embedding images cost, added to by every call.
struct EncodeCounters {
    uint64_t images_encoded = 0;
    uint64_t embed_cache_hits = 0;
    uint64_t embed_cache_misses = 0;
    uint64_t batched_encodes = 0;  // projector calls that encoded several images at once
};

// Embeddings for these images and audio clips, in order, from the model's cache or its projector.
// What is not yet cached is encoded under the projector lock, several at a time with mtmd's batch
// encode where the projector can; the same content twice is encoded once. The caller holds the
// model. Throws ImageError or AudioError (the failed input's kind) naming it; nothing is added to the
// cache then. `idle`, where given, is the caller's context (no graph in flight on it): its workers
// are sent to sleep before the projector computes (rest_threads).
std::vector<std::shared_ptr<const MediaEmbedding>> embed_media(Model & model,
                                                                const std::vector<const MediaInput *> & images,
                                                                EncodeCounters & counters,
                                                                const ContextPtr * idle = nullptr);

// The mtmd bitmap of one input; throws ImageError or AudioError (the input's kind) if the projector
// cannot take it (no vision / no audio encoder, empty input).
mtmd::bitmap_ptr make_bitmap(const Model & model, const MediaInput & input);

// Decodes an audio file's bytes (wav, mp3 or flac, as mtmd's helper reads them) into mono float
// samples at the projector's sample rate. Throws AudioError if they are not audio it can read.
std::vector<float> decode_audio(Model & model, const std::string & bytes);

}  // namespace llava_kv
