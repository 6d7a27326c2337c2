#include "session.h"

#include <map>

#include "errors.h"
#include "sampling.h"
#include "tokens.h"
#include "session_state.h"
#include "ggml-backend.h"
#include "llama-ext.h"

namespace llava_kv {

namespace {

std::atomic<uint64_t> g_next_session_id{1};

}  // namespace

Session::Session(std::shared_ptr<Model> model, const SessionParams & params)
    : model_(std::move(model)), params_(params), id_(g_next_session_id.fetch_add(1)) {
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
    model_->check_context_memory(params_.n_ctx);
    llama_context_params cparams = model_->context_params(params_.n_threads);
    cparams.n_ctx = static_cast<uint32_t>(params_.n_ctx);
    cparams.n_batch = static_cast<uint32_t>(params_.n_batch);
    cparams.n_ubatch = static_cast<uint32_t>(params_.n_ubatch);
    cparams.n_seq_max = 1;
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
    // llama.cpp pads n_ctx up and clamps the batch sizes to it: edits are checked against the n_ctx
    // asked for, and decoded in batches the context really takes.
    params_.n_batch = static_cast<int32_t>(llama_n_batch(ctx_.get()));
    params_.n_ubatch = static_cast<int32_t>(llama_n_ubatch(ctx_.get()));
    registry_ = std::make_unique<ImageEmbedRegistry>(ctx_.get(), model_->projector(), model_->vocab(),
                                                     params_.n_ctx, params_.n_batch, params_.n_ubatch, cancel_,
                                                     stats_.registry);
}

Session::~Session() {
    try {
        close();
    } catch (...) {
        // A destructor must not throw; close() only fails if the model is closing, which frees us.
    }
}

bool Session::abort_requested(void * self) {
    return static_cast<Session *>(self)->cancel_.abort_requested();
}

void Session::free_native() {
    sampler_.reset();
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
    cancel_.closing.store(true);  // a call in flight stops at its next decode step
    std::lock_guard<std::mutex> lock(mutex_);
    free_native();
}

void Session::close_for_model() {
    cancel_.closing.store(true);
    std::lock_guard<std::mutex> lock(mutex_);
    free_native();
}

template <typename Edit>
auto Session::run_edit(Edit && edit) -> decltype(edit()) {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(mutex_);
    check_open();
    cancel_.cancel.store(false);
    const SessionStats before = stats_;
    try {
        return edit();
    } catch (...) {
        stats_ = before;
        throw;
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
    std::vector<llama_token> tokens = tokenize_locked(text);
    if (add_special && llama_vocab_get_add_bos(model_->vocab())) {
        tokens.insert(tokens.begin(), llama_vocab_bos(model_->vocab()));
    }
    return tokens;
}

std::vector<uint64_t> Session::splice(size_t begin, size_t end, const std::vector<ChunkInput> & inputs) {
    return run_edit([&] {
        std::vector<const MediaInput *> pixels;
        for (const auto & input : inputs) {
            if (input.kind == ChunkKind::Image) {
                pixels.push_back(&input.image);
            }
        }
        const auto embeddings = embed_media(*model_, pixels, stats_.encode);
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
    });
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
        info.generated = c.generated;
        if (c.kind == ChunkKind::Text) {
            info.tokens = c.tokens;
        } else {
            info.digest = c.image->digest;
            info.width = c.image->width;
            info.height = c.image->height;
            info.audio = c.image->audio;
            info.n_samples = c.image->n_samples;
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
    for (const auto & [device, sizes] : by_device) {
        if (sizes.first) {
            out.push_back({"kv", device, sizes.first, id_});
        }
        if (sizes.second) {
            out.push_back({"compute", device, sizes.second, id_});
        }
    }
    return out;
}

}  // namespace llava_kv

namespace llava_kv {

void Session::begin_generation(const SamplingParams & p) {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(mutex_);
    check_open();
    sampler_ = make_sampler_chain(p, model_->n_vocab());
    pending_utf8_.clear();
}

GenerationStep Session::generate_step() {
    return run_edit([&] {
        if (!sampler_) {
            throw Error("generate_step() before begin_generation()");
        }
        if (!registry_->has_logits()) {
            throw Error(registry_->timeline().empty()
                            ? "nothing to generate from: the session is empty"
                            : "nothing to generate from: the timeline ends with image tokens; append text first");
        }
        const std::vector<float> & logits = registry_->logits();
        std::vector<llama_token_data> candidates(logits.size());
        for (size_t i = 0; i < logits.size(); ++i) {
            candidates[i] = {static_cast<llama_token>(i), logits[i], 0.0f};
        }
        llama_token_data_array array{candidates.data(), candidates.size(), -1, false};
        llama_sampler_apply(sampler_.get(), &array);
        if (array.selected < 0 || static_cast<size_t>(array.selected) >= array.size) {
            throw Error("the sampler selected no token");
        }
        GenerationStep step;
        step.token = array.data[array.selected].id;
        if (llama_vocab_is_eog(model_->vocab(), step.token)) {
            step.end_of_generation = true;
            return step;
        }
        const std::string piece = token_piece(model_->vocab(), step.token);
        registry_->append_generated(step.token, piece);
        llama_sampler_accept(sampler_.get(), step.token);
        stats_.tokens_generated += 1;
        pending_utf8_ += piece;
        const size_t n = complete_utf8_prefix(pending_utf8_);
        step.text = pending_utf8_.substr(0, n);
        pending_utf8_.erase(0, n);
        return step;
    });
}

std::string Session::flush_generation() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::string out;
    out.swap(pending_utf8_);
    return out;
}

std::string Session::detokenize(const std::vector<llama_token> & tokens) const {
    auto hold = model_->hold();
    std::string out;
    for (llama_token t : tokens) {
        if (t < 0 || t >= model_->n_vocab()) {
            throw std::out_of_range("token id " + std::to_string(t) + " is outside the vocabulary");
        }
        out += token_piece(model_->vocab(), t);
    }
    return out;
}

}  // namespace llava_kv

namespace llava_kv {

std::string Session::save_state() const {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(mutex_);
    check_open();
    std::string kv(llama_state_seq_get_size(ctx_.get(), 0), '\0');
    const size_t n = llama_state_seq_get_data(ctx_.get(), reinterpret_cast<uint8_t *>(kv.data()), kv.size(), 0);
    if (n == 0 && !kv.empty()) {
        throw Error("could not read the KV cache state");
    }
    kv.resize(n);
    StateHeader header;
    header.n_ctx = static_cast<uint32_t>(params_.n_ctx);
    header.n_batch = static_cast<uint32_t>(params_.n_batch);
    header.n_ubatch = static_cast<uint32_t>(params_.n_ubatch);
    header.n_cells = static_cast<uint32_t>(registry_->n_cells());
    header.n_vocab = static_cast<uint32_t>(model_->n_vocab());
    header.n_embd_inp = static_cast<uint32_t>(llama_model_n_embd_inp(model_->llama()));
    return serialize_state(header, registry_->snapshot(), kv);
}

void Session::load_state(const std::string & blob) {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(mutex_);
    check_open();
    if (!registry_->timeline().empty()) {
        throw Error("load_state needs an empty session");
    }
    // Everything is checked against this model and context before llama.cpp reads a byte of it.
    const StateHeader header = inspect_state(blob);
    check_state_fits(header, *model_);
    if (header.n_cells > static_cast<uint32_t>(params_.n_ctx)) {
        throw ContextFullError(header.n_cells, params_.n_ctx,
                               "the saved session needs " + std::to_string(header.n_cells) +
                                   " KV cells but this context holds " + std::to_string(params_.n_ctx));
    }
    std::string kv;
    StateHeader unused;
    RegistrySnapshot snap = deserialize_state(blob, unused, kv);
    long long cells = 0;
    for (const auto & c : snap.timeline) {
        cells += (c.kind == ChunkKind::Text ? static_cast<long long>(c.tokens.size()) : c.image->n_tokens);
    }
    cells += (!snap.timeline.empty() && llama_vocab_get_add_bos(model_->vocab())) ? 1 : 0;
    if (cells != static_cast<long long>(header.n_cells)) {
        throw Error("corrupt session state: its timeline takes " + std::to_string(cells) +
                    " KV cells but its header says " + std::to_string(header.n_cells));
    }
    for (const auto & c : snap.timeline) {
        for (llama_token t : c.tokens) {
            if (t < 0 || t >= model_->n_vocab()) {
                throw Error("the saved session has token ids outside this model's vocabulary");
            }
        }
    }
    try {
        if (!kv.empty() && llama_state_seq_set_data(ctx_.get(), reinterpret_cast<const uint8_t *>(kv.data()),
                                                    kv.size(), 0) == 0) {
            throw Error("the saved KV cache does not fit this model or context");
        }
        registry_->restore(std::move(snap), llama_model_n_embd_inp(model_->llama()));
    } catch (...) {
        registry_->clear();
        throw;
    }
    // Later edits and other sessions reuse the restored embeddings.
    for (const auto & c : registry_->timeline()) {
        if (c.kind == ChunkKind::Image && !model_->embedding_cache().peek(c.image->digest)) {
            model_->embedding_cache().put(c.image);
        }
    }
}

void check_state_fits(const StateHeader & header, const Model & model) {
    if (header.n_vocab != static_cast<uint32_t>(model.n_vocab()) ||
        header.n_embd_inp != static_cast<uint32_t>(llama_model_n_embd_inp(model.llama()))) {
        throw Error("the saved session is for a model with " + std::to_string(header.n_vocab) + " tokens and width " +
                    std::to_string(header.n_embd_inp) + ", not this one (" + std::to_string(model.n_vocab()) +
                    " tokens, width " + std::to_string(llama_model_n_embd_inp(model.llama())) + ")");
    }
    if (header.n_cells > header.n_ctx || header.n_batch == 0 || header.n_ubatch == 0 ||
        header.n_ubatch > header.n_batch || header.n_ctx > static_cast<uint32_t>(INT32_MAX)) {
        throw Error("corrupt session state: inconsistent sizes (n_ctx " + std::to_string(header.n_ctx) + ", n_batch " +
                    std::to_string(header.n_batch) + ", n_ubatch " + std::to_string(header.n_ubatch) + ", cells " +
                    std::to_string(header.n_cells) + ")");
    }
}

}  // namespace llava_kv
