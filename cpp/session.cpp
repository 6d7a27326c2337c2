#include "session.h"

#include <map>

#include "errors.h"
#include "ggml-backend.h"
#include "llama-ext.h"

namespace llava_kv {

extern std::atomic<long> g_live_sessions;

namespace {

std::atomic<uint64_t> g_next_session_id{1};

}  // namespace

Session::Session(std::shared_ptr<Model> model, const SessionParams & params)
    : model_(std::move(model)), params_(params), id_(g_next_session_id.fetch_add(1)) {
    g_live_sessions.fetch_add(1);
    // Constructed fully or not at all: a throw below must not leave the count raised.
    struct Uncount {
        bool armed = true;
        ~Uncount() {
            if (armed) {
                g_live_sessions.fetch_sub(1);
            }
        }
    } uncount;
    if (params_.n_ctx < 1) {
        throw std::invalid_argument("n_ctx must be >= 1, got " + std::to_string(params_.n_ctx));
    }
    if (params_.n_batch < 1) {
        throw std::invalid_argument("n_batch must be >= 1, got " + std::to_string(params_.n_batch));
    }
    if (params_.n_ubatch < 0) {
        throw std::invalid_argument("n_ubatch must be >= 1 (or 0 for n_batch)");
    }
    if (params_.n_ubatch == 0 || params_.n_ubatch > params_.n_batch) {
        params_.n_ubatch = params_.n_batch;
    }
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = static_cast<uint32_t>(params_.n_ctx);
    cparams.n_batch = static_cast<uint32_t>(params_.n_batch);
    cparams.n_ubatch = static_cast<uint32_t>(params_.n_ubatch);
    cparams.n_seq_max = 1;
    const int32_t threads = params_.n_threads > 0 ? params_.n_threads : model_->n_threads();
    cparams.n_threads = threads;
    cparams.n_threads_batch = threads;
    cparams.no_perf = true;
    cparams.abort_callback = &Session::abort_requested;
    cparams.abort_callback_data = this;
    take_logged_errors();
    ctx_.reset(llama_init_from_model(model_->llama(), cparams));
    if (!ctx_) {
        std::string why = take_logged_errors();
        throw Error("could not create a context with n_ctx=" + std::to_string(params_.n_ctx) +
                    ", n_batch=" + std::to_string(params_.n_batch) + " (out of memory?)" +
                    (why.empty() ? "" : "\nllama.cpp said:\n" + why));
    }
    // llama.cpp may round n_ctx up (padding); the registry checks against what it really holds.
    params_.n_ctx = static_cast<int32_t>(llama_n_ctx(ctx_.get()));
    registry_ = std::make_unique<ImageEmbedRegistry>(ctx_.get(), model_->projector(), model_->vocab(),
                                                     params_.n_batch, params_.n_ubatch, stats_.registry);
    uncount.armed = false;
}

Session::~Session() {
    try {
        close();
    } catch (...) {
        // A destructor must not throw; close() only fails if the model is closing, which frees us.
    }
    g_live_sessions.fetch_sub(1);
}

bool Session::abort_requested(void * self) {
    return static_cast<Session *>(self)->cancel_.load(std::memory_order_relaxed);
}

void Session::free_native() {
    registry_.reset();
    ctx_.reset();
    closed_.store(true);
}

void Session::close() {
    if (closed_.load()) {
        return;
    }
    std::shared_lock<std::shared_mutex> hold;
    try {
        hold = model_->hold();
    } catch (const ClosedError &) {
        return;  // the model's close() has closed (or is closing) this session
    }
    cancel_.store(true);
    std::lock_guard<std::mutex> lock(mutex_);
    free_native();
}

void Session::close_for_model() {
    cancel_.store(true);
    std::lock_guard<std::mutex> lock(mutex_);
    free_native();
}

void Session::check_open() const {
    if (closed_.load()) {
        throw ClosedError("the session is closed");
    }
}

std::vector<llama_token> Session::tokenize_locked(const std::string & text) const {
    // As mtmd tokenizes the text between media markers: no special tokens added, special tokens parsed.
    const llama_vocab * vocab = model_->vocab();
    std::vector<llama_token> tokens(text.size() + 2);
    int32_t n = llama_tokenize(vocab, text.data(), static_cast<int32_t>(text.size()), tokens.data(),
                               static_cast<int32_t>(tokens.size()), false, true);
    if (n < 0) {
        tokens.resize(static_cast<size_t>(-n));
        n = llama_tokenize(vocab, text.data(), static_cast<int32_t>(text.size()), tokens.data(),
                           static_cast<int32_t>(tokens.size()), false, true);
    }
    if (n < 0) {
        throw Error("tokenization failed for a text of " + std::to_string(text.size()) + " bytes");
    }
    tokens.resize(static_cast<size_t>(n));
    return tokens;
}

std::vector<llama_token> Session::tokenize(const std::string & text, bool add_special) const {
    auto hold = model_->hold();
    std::vector<llama_token> tokens = tokenize_locked(text);
    if (add_special && llama_vocab_get_add_bos(model_->vocab())) {
        tokens.insert(tokens.begin(), llama_vocab_bos(model_->vocab()));
    }
    return tokens;
}

struct Session::PendingImage {
    const ImagePixels * pixels = nullptr;
    mtmd::input_chunks_ptr chunks;
    std::shared_ptr<ImageEmbedding> entry;
};

Session::PendingImage Session::tokenize_image(const ImagePixels & pixels) {
    mtmd_context * projector = model_->projector();
    if (pixels.data == nullptr || pixels.width == 0 || pixels.height == 0) {
        throw ImageError("empty image (" + std::to_string(pixels.width) + "x" + std::to_string(pixels.height) + ")");
    }
    mtmd::bitmap_ptr bitmap(mtmd_bitmap_init(pixels.width, pixels.height, pixels.data));
    if (!bitmap) {
        throw ImageError("could not create a bitmap of " + std::to_string(pixels.width) + "x" +
                         std::to_string(pixels.height) + " pixels");
    }
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
        throw ImageError("the projector could not preprocess the image '" + pixels.source + "' (" +
                         std::to_string(pixels.width) + "x" + std::to_string(pixels.height) + ", status " +
                         std::to_string(status) + ")" + (why.empty() ? "" : ": " + why));
    }
    p.entry = std::make_shared<ImageEmbedding>();
    p.entry->digest = pixels.digest;
    p.entry->width = pixels.width;
    p.entry->height = pixels.height;
    for (size_t i = 0; i < mtmd_input_chunks_size(p.chunks.get()); ++i) {
        const mtmd_input_chunk * chunk = mtmd_input_chunks_get(p.chunks.get(), i);
        p.entry->n_tokens += static_cast<int32_t>(mtmd_input_chunk_get_n_tokens(chunk));
        p.entry->n_pos += mtmd_input_chunk_get_n_pos(chunk);
    }
    if (p.entry->n_tokens == 0) {
        throw ImageError("the projector produced no tokens for the image '" + pixels.source + "'");
    }
    p.entry->embeddings.resize(mtmd_input_chunks_size(p.chunks.get()));
    return p;
}

void Session::encode_pending(std::vector<PendingImage> & pending) {
    mtmd_context * projector = model_->projector();
    const size_t n_embd = static_cast<size_t>(llama_model_n_embd_inp(model_->llama()));
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
        throw ImageError("the projector failed to encode the image '" + job.image->pixels->source + "'" +
                         (why.empty() ? "" : ": " + why));
    };
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
            jobs[next].image->entry->embeddings[jobs[next].index].assign(embd, embd + n * n_embd);
            ++next;
            continue;
        }
        stats_.batched_encodes += 1;
        if (mtmd_batch_encode(batch.get()) != 0) {
            fail(jobs[next]);
        }
        for (size_t j = next; j < end; ++j) {
            const float * embd = mtmd_batch_get_output_embd(batch.get(), jobs[j].chunk);
            if (embd == nullptr) {
                fail(jobs[j]);
            }
            const size_t n = mtmd_input_chunk_get_n_tokens(jobs[j].chunk);
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
                throw ImageError("could not keep the layout of the encoded image '" + p.pixels->source + "'");
            }
        }
        p.chunks.reset();
    }
}

std::vector<std::shared_ptr<const ImageEmbedding>> Session::embed_images(
    const std::vector<const ImagePixels *> & images) {
    std::vector<std::shared_ptr<const ImageEmbedding>> out(images.size());
    if (images.empty()) {
        return out;
    }
    if (model_->projector() == nullptr || !model_->has_vision()) {
        throw ImageError("this model has no vision projector: load it with mmproj_path to use images");
    }
    EmbeddingCache & cache = model_->embedding_cache();
    std::vector<size_t> missing;
    for (size_t i = 0; i < images.size(); ++i) {
        if ((out[i] = cache.get(images[i]->digest))) {
            stats_.embed_cache_hits += 1;
        } else {
            missing.push_back(i);
        }
    }
    if (missing.empty()) {
        return out;
    }
    // One encode at a time per projector; another session may have encoded some meanwhile.
    std::lock_guard<std::mutex> lock(model_->projector_mutex());
    std::vector<PendingImage> pending;
    std::map<std::string, size_t> pending_by_digest;
    for (size_t i : missing) {
        const std::string & digest = images[i]->digest;
        if (pending_by_digest.count(digest) == 0) {
            if ((out[i] = cache.peek(digest))) {
                stats_.embed_cache_hits += 1;
                continue;
            }
            pending_by_digest[digest] = pending.size();
            pending.push_back(tokenize_image(*images[i]));
            stats_.embed_cache_misses += 1;
        } else {
            stats_.embed_cache_hits += 1;  // the same picture twice in one edit: encoded once
        }
    }
    encode_pending(pending);
    for (auto & p : pending) {
        stats_.images_encoded += 1;
        cache.put(p.entry);
    }
    for (size_t i : missing) {
        if (!out[i]) {
            out[i] = pending[pending_by_digest.at(images[i]->digest)].entry;
        }
    }
    return out;
}

std::vector<uint64_t> Session::splice(size_t begin, size_t end, const std::vector<ChunkInput> & inputs) {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(mutex_);
    check_open();
    cancel_.store(false);
    const SessionStats before = stats_;
    try {
        std::vector<const ImagePixels *> pixels;
        for (const auto & input : inputs) {
            if (input.kind == ChunkKind::Image) {
                pixels.push_back(&input.image);
            }
        }
        const auto embeddings = embed_images(pixels);
        std::vector<ChunkSpec> specs;
        specs.reserve(inputs.size());
        size_t next_image = 0;
        for (const auto & input : inputs) {
            ChunkSpec spec;
            spec.kind = input.kind;
            if (input.kind == ChunkKind::Text) {
                spec.tokens = tokenize_locked(input.text);
                spec.source = input.text;
                if (spec.tokens.empty()) {
                    continue;
                }
            } else {
                spec.image = embeddings[next_image++];
                spec.source = input.image.source;
            }
            specs.push_back(std::move(spec));
        }
        return registry_->splice(begin, end, std::move(specs));
    } catch (...) {
        stats_ = before;
        throw;
    }
}

void Session::remove_shift(uint64_t chunk_id) {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(mutex_);
    check_open();
    cancel_.store(false);
    const SessionStats before = stats_;
    try {
        registry_->remove_shift(registry_->index_of(chunk_id));
    } catch (...) {
        stats_ = before;
        throw;
    }
}

void Session::remove_chunks(const std::vector<uint64_t> & chunk_ids) {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(mutex_);
    check_open();
    cancel_.store(false);
    std::vector<size_t> indices;
    for (uint64_t id : chunk_ids) {
        indices.push_back(registry_->index_of(id));
    }
    const SessionStats before = stats_;
    try {
        registry_->remove(std::move(indices));
    } catch (...) {
        stats_ = before;
        throw;
    }
}

size_t Session::index_of(uint64_t chunk_id) const {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(mutex_);
    check_open();
    return registry_->index_of(chunk_id);
}

void Session::clear() {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(mutex_);
    check_open();
    registry_->clear();
}

std::vector<ChunkInfo> Session::timeline() const {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(mutex_);
    check_open();
    std::vector<ChunkInfo> out;
    for (const auto & c : registry_->timeline()) {
        ChunkInfo info;
        info.id = c.id;
        info.kind = c.kind;
        info.n_tokens = c.n_cells;
        info.pos0 = c.pos0;
        info.pos1 = c.pos1;
        info.source = c.source;
        if (c.kind == ChunkKind::Text) {
            info.tokens = c.tokens;
        } else {
            info.digest = c.image->digest;
            info.width = c.image->width;
            info.height = c.image->height;
        }
        out.push_back(std::move(info));
    }
    return out;
}

std::vector<float> Session::logits() const {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(mutex_);
    check_open();
    if (!registry_->has_logits()) {
        if (registry_->timeline().empty()) {
            throw Error("no logits yet: the session is empty; append text first");
        }
        throw Error("no logits: the timeline ends with an image, which produces none (as in llama.cpp); "
                    "append text after it");
    }
    return registry_->logits();
}

llama_pos Session::n_past() const {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(mutex_);
    check_open();
    return registry_->n_past();
}

int32_t Session::n_cells() const {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(mutex_);
    check_open();
    return registry_->n_cells();
}

SessionStats Session::stats() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
}

std::vector<MemoryEntry> Session::memory_entries() const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<MemoryEntry> out;
    if (closed_.load()) {
        return out;
    }
    std::map<std::string, std::pair<size_t, size_t>> by_device;
    for (const auto & [buft, data] : llama_get_memory_breakdown(ctx_.get())) {
        auto & slot = by_device[buft_device_name(buft)];
        slot.first += data.context;
        slot.second += data.compute;
    }
    const std::string prefix = "session:" + std::to_string(id_) + ":";
    for (const auto & [device, sizes] : by_device) {
        if (sizes.first) {
            out.push_back({prefix + "kv", device, sizes.first});
        }
        if (sizes.second) {
            out.push_back({prefix + "compute", device, sizes.second});
        }
    }
    return out;
}

}  // namespace llava_kv
