// Session: its lifecycle, its context (own or a pool's), edits and what it reports. Generation is in
// session_generate.cpp, save and load in session_save.cpp.
#include "session.h"

#include <algorithm>
#include <map>

#include "device_ledger.h"
#include "errors.h"
#include "sampling.h"
#include "tokens.h"
#include "ggml-backend.h"
#include "llama-ext.h"

namespace llava_kv {

namespace {

std::atomic<uint64_t> g_next_session_id{1};

}  // namespace

bool SharedContext::abort_requested(void * self) {
    const auto * shared = static_cast<const SharedContext *>(self);
    for (const CancelState * state : shared->active) {
        if (shared->step ? state->closing.load(std::memory_order_relaxed) : state->abort_requested()) {
            return true;
        }
    }
    return false;
}

namespace {

void check_session_params(SessionParams & params) {
    if (params.n_ctx < 1) {
        throw std::invalid_argument("n_ctx must be >= 1, got " + std::to_string(params.n_ctx));
    }
    if (params.n_batch < 1) {
        throw std::invalid_argument("n_batch must be >= 1, got " + std::to_string(params.n_batch));
    }
    if (params.n_ubatch < 0) {
        throw std::invalid_argument("n_ubatch must be >= 1 (or 0 for n_batch)");
    }
    if (params.n_ubatch == 0 || params.n_ubatch > params.n_batch) {
        params.n_ubatch = params.n_batch;
    }
}

// A context of `n_seq` sequences of params.n_ctx cells each; params' batch sizes become the ones
// llama.cpp really gave it (it pads n_ctx up and clamps the batch sizes to it).
std::shared_ptr<SharedContext> make_shared_context(const Model & model, SessionParams & params, int32_t n_seq,
                                                   uint64_t ledger_id) {
    check_session_params(params);
    LedgerOwner owner("session", ledger_id);
    const int64_t cells = int64_t(params.n_ctx) * n_seq;
    if (cells > INT32_MAX) {
        throw std::invalid_argument("n_ctx x slots = " + std::to_string(cells) + " KV cells is more than a context holds");
    }
    model.check_context_memory(cells);
    auto shared = std::make_shared<SharedContext>();
    shared->n_seq = n_seq;
    shared->open.assign(static_cast<size_t>(n_seq), true);
    llama_context_params cparams = model.context_params(params.n_threads);
    cparams.n_ctx = static_cast<uint32_t>(cells);
    cparams.n_batch = static_cast<uint32_t>(params.n_batch);
    cparams.n_ubatch = static_cast<uint32_t>(params.n_ubatch);
    // A context of its own also gets more sequences in the same cell buffer (kv_unified), empty
    // except during a blend edit, which parks the KV cells it keeps in sequence 1
    // (ImageEmbedRegistry), and while generate_branches() samples several replies.
    cparams.n_seq_max = static_cast<uint32_t>(n_seq == 1 ? kFirstBranchSeq + kMaxBranches : n_seq);
    cparams.kv_unified = n_seq == 1;
    // llama.cpp sizes its output buffer for n_seq_max rows at least; by default it allows n_batch.
    cparams.n_outputs_max = std::max(cparams.n_batch, cparams.n_seq_max);
    cparams.abort_callback = &SharedContext::abort_requested;
    cparams.abort_callback_data = shared.get();
    take_logged_errors();
    shared->ctx = model.new_context(cparams);
    if (!shared->ctx) {
        std::string why = take_logged_errors();
        throw Error("could not create a context with n_ctx=" + std::to_string(params.n_ctx) +
                    (n_seq > 1 ? " x " + std::to_string(n_seq) + " slots" : std::string()) +
                    ", n_batch=" + std::to_string(params.n_batch) + " (out of memory?)" +
                    (why.empty() ? "" : "\nllama.cpp said:\n" + why));
    }
    params.n_batch = static_cast<int32_t>(llama_n_batch(shared->ctx.get()));
    params.n_ubatch = static_cast<int32_t>(llama_n_ubatch(shared->ctx.get()));
    return shared;
}

}  // namespace

Session::Session(std::shared_ptr<Model> model, const SessionParams & params)
    : model_(std::move(model)), params_(params), id_(g_next_session_id.fetch_add(1)) {
    shared_ = make_shared_context(*model_, params_, 1, id_);
    open_context();
}

Session::Session(std::shared_ptr<Model> model, const SessionParams & params, std::shared_ptr<SharedContext> shared,
                 llama_seq_id seq)
    : model_(std::move(model)), params_(params), id_(g_next_session_id.fetch_add(1)), shared_(std::move(shared)),
      seq_(seq) {
    open_context();
}

void Session::open_context() {
    // Edits are checked against the n_ctx asked for (llama.cpp may allocate a few more cells).
    const llama_seq_id parking = shared_->n_seq == 1 ? 1 : -1;
    registry_ = std::make_unique<ImageEmbedRegistry>(ctx(), seq_, parking, model_->projector(), model_->vocab(),
                                                     params_.n_ctx, params_.n_batch, params_.n_ubatch, cancel_,
                                                     stats_.registry);
}

std::vector<std::shared_ptr<Session>> open_session_pool(const std::shared_ptr<Model> & model,
                                                        const SessionParams & params, int32_t n_slots) {
    if (n_slots < 1 || n_slots > 256) {
        throw std::invalid_argument("slots must be between 1 and 256, got " + std::to_string(n_slots));
    }
    SessionParams p = params;
    auto shared = make_shared_context(*model, p, n_slots, 0);
    std::vector<std::shared_ptr<Session>> out;
    for (int32_t i = 0; i < n_slots; ++i) {
        SessionParams slot = p;
        slot.seed = p.seed + static_cast<uint32_t>(i);
        out.push_back(std::make_shared<Session>(model, slot, shared, i));
    }
    return out;
}

Session::~Session() {
    try {
        close();
    } catch (...) {
        // A destructor must not throw; close() only fails if the model is closing, which frees us.
    }
}

void Session::free_native(bool drop_context) {
    reply_.reset();
    if (registry_ && shared_->ctx && !drop_context && shared_->n_seq > 1) {
        llama_memory_seq_rm(llama_get_memory(shared_->ctx.get()), seq_, -1, -1);
    }
    registry_.reset();
    shared_->open[static_cast<size_t>(seq_)] = false;
    const bool any_open = std::find(shared_->open.begin(), shared_->open.end(), true) != shared_->open.end();
    if (drop_context || !any_open) {
        shared_->ctx.reset();
    }
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
    cancel_.closing.store(true);  // a call in flight stops at its next decode step
    std::lock_guard<std::mutex> lock(shared_->mutex);
    if (!closed_.load()) {
        free_native(false);
    }
}

void Session::close_for_model() {
    cancel_.closing.store(true);
    std::lock_guard<std::mutex> lock(shared_->mutex);
    if (!closed_.load()) {
        free_native(true);
    }
}

void Session::check_open() const {
    if (closed_.load()) {
        throw ClosedError("the session is closed");
    }
    if (cancel_.closing.load()) {
        throw ClosedError("the session is closing");
    }
}

std::vector<llama_token> Session::tokenize_locked(const std::string & text) const {
    return tokenize_text(model_->vocab(), text);
}

std::vector<llama_token> Session::tokenize(const std::string & text, bool add_special) const {
    auto hold = model_->hold();
    return model_->tokenize(text, add_special);
}

std::vector<ChunkSpec> Session::specs_locked(const std::vector<ChunkInput> & inputs) {
    std::vector<const MediaInput *> pixels;
    for (const auto & input : inputs) {
        if (is_media(input.kind)) {
            pixels.push_back(&input.media);
        }
    }
    const auto embeddings = embed_media(*model_, pixels, stats_.encode, &shared_->ctx);
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
            spec.media = embeddings[next_image++];
            spec.source = input.media.source;
        }
        specs.push_back(std::move(spec));
    }
    return specs;
}

std::vector<uint64_t> Session::splice(size_t begin, size_t end, const std::vector<ChunkInput> & inputs) {
    return run_edit([&] { return registry_->splice(begin, end, specs_locked(inputs)); });
}

std::vector<uint64_t> Session::splice_blend(size_t begin, size_t end, const std::vector<ChunkInput> & inputs,
                                            int32_t k, bool allow_drift, BlendReport & report) {
    return run_edit([&] { return registry_->splice_blend(begin, end, specs_locked(inputs), k, allow_drift, report); });
}

bool Session::exact() const {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(shared_->mutex);
    check_open();
    return registry_->exact();
}

int32_t Session::recompute() {
    return run_edit([&] { return registry_->recompute(); });
}

void Session::remove_shift(uint64_t chunk_id) {
    run_edit([&] { registry_->remove_shift(registry_->index_of(chunk_id)); });
}

void Session::remove_chunks(const std::vector<uint64_t> & chunk_ids) {
    run_edit([&] {
        std::vector<size_t> indices;
        for (uint64_t id : chunk_ids) {
            indices.push_back(registry_->index_of(id));
        }
        registry_->remove(std::move(indices));
    });
}

size_t Session::index_of(uint64_t chunk_id) const {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(shared_->mutex);
    check_open();
    return registry_->index_of(chunk_id);
}

void Session::clear() {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(shared_->mutex);
    check_open();
    registry_->clear();
}

std::vector<ChunkInfo> Session::timeline() const {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(shared_->mutex);
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
        info.generated = c.generated;
        if (c.kind == ChunkKind::Text) {
            info.tokens = c.tokens;
        } else {
            info.digest = c.media->digest;
            info.width = c.media->width;
            info.height = c.media->height;
            info.n_samples = c.media->n_samples;
        }
        out.push_back(std::move(info));
    }
    return out;
}

std::vector<float> Session::logits() const {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(shared_->mutex);
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
    std::lock_guard<std::mutex> lock(shared_->mutex);
    check_open();
    return registry_->n_past();
}

int32_t Session::n_cells() const {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(shared_->mutex);
    check_open();
    return registry_->n_cells();
}

SessionStats Session::stats() const {
    std::lock_guard<std::mutex> lock(shared_->mutex);
    return stats_;
}

std::vector<MemoryEntry> Session::memory_entries() const {
    std::lock_guard<std::mutex> lock(shared_->mutex);
    std::vector<MemoryEntry> out;
    if (closed_.load() || !shared_->ctx) {
        return out;
    }
    // A pool's context is reported once, under its lowest open slot.
    const auto first_open = std::find(shared_->open.begin(), shared_->open.end(), true) - shared_->open.begin();
    if (first_open != seq_) {
        return out;
    }
    MemoryEntry tag;
    tag.session_id = id_;
    return context_memory(ctx(), tag);
}

}  // namespace llava_kv
