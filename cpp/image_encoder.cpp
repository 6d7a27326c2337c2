#include "image_encoder.h"

#include <cstring>
#include <map>

#include "device_ledger.h"
#include "decode.h"
#include "errors.h"
#include "model.h"
#include "mtmd-helper.h"
#include "runtime.h"

namespace llava_kv {

void throw_media_error(const MediaInput & input, const std::string & what) {
    if (input.is_audio()) {
        throw AudioError(what);
    }
    throw ImageError(what);
}

mtmd::bitmap_ptr make_bitmap(const Model & model, const MediaInput & input) {
    if (input.is_audio()) {
        if (!mtmd_support_audio(model.projector())) {
            throw AudioError("this projector takes no audio; load a model whose mmproj has an audio encoder");
        }
        if (input.n_samples == 0) {
            throw AudioError("empty audio clip '" + input.source + "'");
        }
        mtmd::bitmap_ptr bitmap(mtmd_bitmap_init_from_audio(input.n_samples, input.samples));
        if (!bitmap) {
            throw AudioError("could not create an audio buffer of " + std::to_string(input.n_samples) + " samples");
        }
        return bitmap;
    }
    if (!model.has_vision()) {
        throw ImageError("this model has no vision projector: load it with an mmproj_path that has a vision encoder");
    }
    if (input.data == nullptr || input.width == 0 || input.height == 0) {
        throw ImageError("empty image (" + std::to_string(input.width) + "x" + std::to_string(input.height) + ")");
    }
    mtmd::bitmap_ptr bitmap(mtmd_bitmap_init(input.width, input.height, input.data));
    if (!bitmap) {
        throw ImageError("could not create a bitmap of " + std::to_string(input.width) + "x" +
                         std::to_string(input.height) + " pixels");
    }
    return bitmap;
}

namespace {

struct PendingImage {
    const MediaInput * pixels = nullptr;
    mtmd::input_chunks_ptr chunks;
    std::shared_ptr<MediaEmbedding> entry;
};

std::string describe(const MediaInput & input) {
    if (input.is_audio()) {
        return "the audio clip '" + input.source + "' (" + std::to_string(input.n_samples) + " samples)";
    }
    return "the image '" + input.source + "' (" + std::to_string(input.width) + "x" + std::to_string(input.height) + ")";
}

PendingImage tokenize_image(Model & model, const MediaInput & pixels) {
    mtmd_context * projector = model.projector();
    mtmd::bitmap_ptr bitmap = make_bitmap(model, pixels);
    mtmd_bitmap_set_id(bitmap.get(), pixels.digest.c_str());
    PendingImage p;
    p.pixels = &pixels;
    p.chunks.reset(mtmd_input_chunks_init());
    const std::string marker = mtmd_default_marker();
    mtmd_input_text text{marker.c_str(), marker.size(), false, true};
    const mtmd_bitmap * bitmaps[] = {bitmap.get()};
    take_logged_errors();
    const int32_t status = mtmd_tokenize(projector, p.chunks.get(), &text, bitmaps, 1);
    if (status != 0) {
        const std::string why = take_logged_errors();
        throw_media_error(pixels, "the projector could not preprocess " + describe(pixels) + " (status " +
                                      std::to_string(status) + ")" + (why.empty() ? "" : ": " + why));
    }
    p.entry = std::make_shared<MediaEmbedding>();
    p.entry->digest = pixels.digest;
    p.entry->width = pixels.width;
    p.entry->height = pixels.height;
    p.entry->kind = pixels.is_audio() ? ChunkKind::Audio : ChunkKind::Image;
    p.entry->n_samples = pixels.n_samples;
    for (size_t i = 0; i < mtmd_input_chunks_size(p.chunks.get()); ++i) {
        const mtmd_input_chunk * chunk = mtmd_input_chunks_get(p.chunks.get(), i);
        p.entry->n_tokens += static_cast<int32_t>(mtmd_input_chunk_get_n_tokens(chunk));
        p.entry->n_pos += mtmd_input_chunk_get_n_pos(chunk);
    }
    if (p.entry->n_tokens == 0) {
        throw_media_error(pixels, "the projector produced no tokens for " + describe(pixels));
    }
    p.entry->embeddings.resize(mtmd_input_chunks_size(p.chunks.get()));
    return p;
}

void encode_pending(Model & model, std::vector<PendingImage> & pending, EncodeCounters & counters) {
    mtmd_context * projector = model.projector();
    const size_t n_embd = static_cast<size_t>(llama_model_n_embd_inp(model.llama()));
    // Every image chunk still to encode, in order.
    struct Job {
        PendingImage * image;
        size_t index;
        const mtmd_input_chunk * chunk;
    };
    std::vector<Job> jobs;
    for (auto & p : pending) {
        for (size_t i = 0; i < mtmd_input_chunks_size(p.chunks.get()); ++i) {
            const mtmd_input_chunk * chunk = mtmd_input_chunks_get(p.chunks.get(), i);
            if (mtmd_input_chunk_get_type(chunk) != MTMD_INPUT_CHUNK_TYPE_TEXT) {
                jobs.push_back({&p, i, chunk});
            }
        }
    }
    auto fail = [](const Job & job) {
        const std::string why = take_logged_errors();
        throw_media_error(*job.image->pixels, "the projector failed to encode " + describe(*job.image->pixels) +
                                                  (why.empty() ? "" : ": " + why));
    };
    // An embedding with NaN or inf would decode into NaN logits: refuse it here, naming the input,
    // before it reaches the cache.
    auto check_finite = [](const Job & job, const float * embd, size_t n) {
        if (!all_finite(embd, n)) {
            throw_media_error(*job.image->pixels,
                              "the projector produced non-finite values (NaN or inf) for " +
                                  describe(*job.image->pixels) +
                                  ": its weights or hyperparameters are broken (or it read memory it never wrote)");
        }
    };
    LedgerOwner owner("projector");  // the projector's compute buffers are made at its first encode
    size_t next = 0;
    while (next < jobs.size()) {
        // Fill one batch with as many consecutive chunks as the projector takes together.
        std::unique_ptr<mtmd_batch, decltype(&mtmd_batch_free)> batch(mtmd_batch_init(projector), &mtmd_batch_free);
        size_t end = next;
        while (end < jobs.size() && batch && mtmd_batch_add_chunk(batch.get(), jobs[end].chunk) == 0) {
            ++end;
        }
        if (end - next <= 1) {
            // Alone (the projector cannot batch it with the next): the plain encode, exactly as
            // mtmd_helper_eval_chunks does it.
            if (mtmd_encode_chunk(projector, jobs[next].chunk) != 0) {
                fail(jobs[next]);
            }
            const float * embd = mtmd_get_output_embd(projector);
            const size_t n = mtmd_input_chunk_get_n_tokens(jobs[next].chunk);
            check_finite(jobs[next], embd, n * n_embd);
            jobs[next].image->entry->embeddings[jobs[next].index].assign(embd, embd + n * n_embd);
            ++next;
            continue;
        }
        counters.batched_encodes += 1;
        if (mtmd_batch_encode(batch.get()) != 0) {
            fail(jobs[next]);
        }
        for (size_t j = next; j < end; ++j) {
            const float * embd = mtmd_batch_get_output_embd(batch.get(), jobs[j].chunk);
            if (embd == nullptr) {
                fail(jobs[j]);
            }
            const size_t n = mtmd_input_chunk_get_n_tokens(jobs[j].chunk);
            check_finite(jobs[j], embd, n * n_embd);
            jobs[j].image->entry->embeddings[jobs[j].index].assign(embd, embd + n * n_embd);
        }
        next = end;
    }
    // Keep only what decoding needs: placeholders have the layout but not the pixels.
    for (auto & p : pending) {
        for (size_t i = 0; i < mtmd_input_chunks_size(p.chunks.get()); ++i) {
            const mtmd_input_chunk * chunk = mtmd_input_chunks_get(p.chunks.get(), i);
            const bool text = mtmd_input_chunk_get_type(chunk) == MTMD_INPUT_CHUNK_TYPE_TEXT;
            p.entry->chunks.emplace_back(text ? mtmd_input_chunk_copy(chunk) : mtmd_input_chunk_get_placeholder(chunk));
            if (!p.entry->chunks.back()) {
                throw_media_error(*p.pixels, "could not keep the layout of the encoded " + describe(*p.pixels));
            }
        }
        p.chunks.reset();
    }
}

}  // namespace

std::vector<std::shared_ptr<const MediaEmbedding>> embed_media(Model & model,
                                                                const std::vector<const MediaInput *> & images,
                                                                EncodeCounters & counters,
                                                                const ContextPtr * idle) {
    std::vector<std::shared_ptr<const MediaEmbedding>> out(images.size());
    if (images.empty()) {
        return out;
    }
    if (model.projector() == nullptr) {
        const bool audio = images.front()->is_audio();
        throw_media_error(*images.front(), std::string("this model has no ") + (audio ? "" : "vision ") +
                                               "projector (no mmproj loaded): load it with mmproj_path to use images or audio");
    }
    EmbeddingCache & cache = model.embedding_cache();
    std::vector<size_t> missing;
    for (size_t i = 0; i < images.size(); ++i) {
        if ((out[i] = cache.get(images[i]->digest))) {
            counters.embed_cache_hits += 1;
        } else {
            missing.push_back(i);
        }
    }
    if (missing.empty()) {
        return out;
    }
    // One encode at a time per projector; another session may have encoded some meanwhile.
    std::lock_guard<std::mutex> lock(model.projector_mutex());
    std::vector<PendingImage> pending;
    std::map<std::string, size_t> pending_by_digest;
    for (size_t i : missing) {
        const std::string & digest = images[i]->digest;
        if (pending_by_digest.count(digest) == 0) {
            if ((out[i] = cache.peek(digest))) {
                counters.embed_cache_hits += 1;
                continue;
            }
            pending_by_digest[digest] = pending.size();
            pending.push_back(tokenize_image(model, *images[i]));
            counters.embed_cache_misses += 1;
        } else {
            counters.embed_cache_hits += 1;  // the same picture twice in one edit: encoded once
        }
    }
    if (idle != nullptr && !pending.empty()) {
        rest_threads(*idle);
    }
    encode_pending(model, pending, counters);
    for (auto & p : pending) {
        counters.images_encoded += 1;
        cache.put(p.entry);
    }
    for (size_t i : missing) {
        if (!out[i]) {
            out[i] = pending[pending_by_digest.at(images[i]->digest)].entry;
        }
    }
    return out;
}

std::vector<float> decode_audio(Model & model, const std::string & bytes) {
    if (model.projector() == nullptr || !mtmd_support_audio(model.projector())) {
        throw AudioError("this model takes no audio: its projector has no audio encoder");
    }
    // Only what starts like an audio file reaches mtmd's decoder (which would try other bytes as an
    // image with stb_image): RIFF/WAVE, FLAC, MP3 with an ID3 tag or an MPEG frame sync.
    const auto * b = reinterpret_cast<const unsigned char *>(bytes.data());
    const bool wav = bytes.size() >= 12 && std::memcmp(b, "RIFF", 4) == 0 && std::memcmp(b + 8, "WAVE", 4) == 0;
    const bool flac = bytes.size() >= 4 && std::memcmp(b, "fLaC", 4) == 0;
    const bool mp3 = (bytes.size() >= 3 && std::memcmp(b, "ID3", 3) == 0) ||
                     (bytes.size() >= 2 && b[0] == 0xFF && (b[1] & 0xE0) == 0xE0);
    if (!wav && !flac && !mp3) {
        throw AudioError("not a wav, mp3 or flac file (unknown header)");
    }
    take_logged_errors();
    mtmd::bitmap_ptr bitmap;
    {
        std::lock_guard<std::mutex> lock(model.projector_mutex());
        mtmd_helper_bitmap_wrapper decoded = mtmd_helper_bitmap_init_from_buf(
            model.projector(), reinterpret_cast<const unsigned char *>(bytes.data()), bytes.size(), false,
            mtmd_helper_init_opt_default());
        bitmap.reset(decoded.bitmap);
        if (decoded.video_ctx != nullptr) {
            mtmd_helper_video_free(decoded.video_ctx);  // not audio: refused below
        }
    }
    if (!bitmap || !mtmd_bitmap_is_audio(bitmap.get())) {
        const std::string why = take_logged_errors();
        throw AudioError("not a readable audio file (wav, mp3 or flac)" + (why.empty() ? "" : ": " + why));
    }
    const size_t n = mtmd_bitmap_get_n_bytes(bitmap.get()) / sizeof(float);
    const float * data = reinterpret_cast<const float *>(mtmd_bitmap_get_data(bitmap.get()));
    return std::vector<float>(data, data + n);
}

}  // namespace llava_kv
