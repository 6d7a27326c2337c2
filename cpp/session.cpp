#include "session.h"

#include <algorithm>
#include <map>
#include <new>
#include <set>

#include "device_ledger.h"
#include "errors.h"
#include "sampling.h"
#include "tokens.h"
#include "session_state.h"
#include "ggml-backend.h"
#include "llama-ext.h"

namespace llava_kv {

namespace {

std::atomic<uint64_t> g_next_session_id{1};

// Marks whose call runs on a shared context for the length of one call, for its abort callback.
class Active {
  public:
    Active(SharedContext & shared, std::vector<const CancelState *> states, bool step) : shared_(shared) {
        shared_.active = std::move(states);
        shared_.step = step;
    }
    ~Active() {
        shared_.active.clear();
        shared_.step = false;
    }
    Active(const Active &) = delete;
    Active & operator=(const Active &) = delete;

  private:
    SharedContext & shared_;
};

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
    // A context of its own also gets two more sequences in the same cell buffer (kv_unified), empty
    // except during a blend edit, which parks the KV cells it keeps there (ImageEmbedRegistry).
    cparams.n_seq_max = static_cast<uint32_t>(n_seq == 1 ? 3 : n_seq);
    cparams.kv_unified = n_seq == 1;
    cparams.abort_callback = &SharedContext::abort_requested;
    cparams.abort_callback_data = shared.get();
    take_logged_errors();
    shared->ctx.reset(llama_init_from_model(model.llama(), cparams));
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
    sampler_.reset();
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

template <typename Edit>
auto Session::run_edit(Edit && edit) -> decltype(edit()) {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(shared_->mutex);
    check_open();
    cancel_.cancel.store(false);
    Active active(*shared_, {&cancel_}, false);
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

std::vector<ChunkSpec> Session::specs_locked(const std::vector<ChunkInput> & inputs) {
    std::vector<const MediaInput *> pixels;
    for (const auto & input : inputs) {
        if (is_media(input.kind)) {
            pixels.push_back(&input.media);
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
    std::map<std::string, std::pair<size_t, size_t>> by_device;
    for (const auto & [buft, data] : llama_get_memory_breakdown(ctx())) {
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
    std::lock_guard<std::mutex> lock(shared_->mutex);
    check_open();
    sampler_ = make_sampler_chain(p, model_->n_vocab());
    pending_utf8_.clear();
}

GenerationStep Session::sample_locked() {
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
    step.end_of_generation = llama_vocab_is_eog(model_->vocab(), step.token);
    return step;
}

void Session::accept_locked(GenerationStep & step, const float * logits) {
    const std::string piece = token_piece(model_->vocab(), step.token);
    if (logits) {
        registry_->accept_generated(step.token, piece, logits);
        stats_.batched_steps += 1;
    } else {
        registry_->append_generated(step.token, piece);
    }
    llama_sampler_accept(sampler_.get(), step.token);
    stats_.tokens_generated += 1;
    pending_utf8_ += piece;
    const size_t n = complete_utf8_prefix(pending_utf8_);
    step.text = pending_utf8_.substr(0, n);
    pending_utf8_.erase(0, n);
}

GenerationStep Session::generate_step() {
    return run_edit([&] {
        GenerationStep step = sample_locked();
        if (!step.end_of_generation) {
            accept_locked(step, nullptr);
        }
        return step;
    });
}

std::vector<GenerationStep> Session::step_together(const std::vector<std::shared_ptr<Session>> & sessions) {
    if (sessions.empty()) {
        return {};
    }
    Session & first = *sessions.front();
    std::set<llama_seq_id> seen;
    for (const auto & s : sessions) {
        if (!s) {
            throw std::invalid_argument("step_together: a session is None");
        }
        if (s->shared_ != first.shared_) {
            throw std::invalid_argument("step_together: every session must be a slot of the same pool");
        }
        if (!seen.insert(s->seq_).second) {
            throw std::invalid_argument("step_together: slot " + std::to_string(s->seq_) + " is listed twice");
        }
    }
    auto hold = first.model_->hold();
    SharedContext & shared = *first.shared_;
    std::lock_guard<std::mutex> lock(shared.mutex);
    std::vector<const CancelState *> states;
    for (const auto & s : sessions) {
        s->check_open();
        s->cancel_.cancel.store(false);
        states.push_back(&s->cancel_);
    }
    Active active(shared, states, true);

    // Sample every slot first; nothing has changed yet, so a failure here leaves all as they were.
    // The sampler chains are copied first so that a failed decode can put them back (the random
    // number generator advances as a token is drawn).
    const size_t n = sessions.size();
    std::vector<GenerationStep> steps(n);
    std::vector<llama_sampler_ptr> saved(n);
    std::vector<llama_pos> pos(n, 0);
    const auto put_back_samplers = [&] {
        for (size_t i = 0; i < n; ++i) {
            if (saved[i]) {
                sessions[i]->sampler_ = std::move(saved[i]);
            }
        }
    };
    for (size_t i = 0; i < n; ++i) {
        Session & s = *sessions[i];
        if (s.sampler_) {
            saved[i].reset(llama_sampler_clone(s.sampler_.get()));
        }
        try {
            steps[i] = s.sample_locked();
        } catch (...) {
            put_back_samplers();
            throw;
        }
        if (!steps[i].end_of_generation) {
            pos[i] = s.registry_->next_generated_pos();
        }
    }
    llama_context * ctx = shared.ctx.get();
    llama_batch_ext_ptr batch(llama_batch_ext_init(ctx));
    std::vector<int32_t> out_index(n, -1);
    for (size_t i = 0; i < n; ++i) {
        if (steps[i].end_of_generation) {
            continue;
        }
        const int32_t idx = llama_batch_ext_add_token(batch.get(), sessions[i]->seq_, steps[i].token);
        if (idx < 0) {
            put_back_samplers();
            throw Error("could not build the batched step (more slots than the batch holds?)");
        }
        llama_batch_ext_set_pos(batch.get(), idx, &pos[i]);
        llama_batch_ext_set_output_logits(batch.get(), idx, true);
        out_index[i] = idx;
    }
    int32_t status = 0;
    size_t n_tokens = 0;
    for (int32_t idx : out_index) {
        n_tokens += idx >= 0 ? 1 : 0;
    }
    if (n_tokens > 0) {
        try {
            switch (take_decode_fault()) {  // the test-only fault hook (decode.h)
                case DecodeFault::Status: status = -3; break;
                case DecodeFault::Exception: throw std::bad_alloc();
                case DecodeFault::Close:
                    for (const auto & s : sessions) {
                        s->cancel_.closing.store(true);
                    }
                    break;
                case DecodeFault::Pause: pause_decode(); break;
                default: break;  // a cancel() does not stop a step shared with other slots
            }
            if (status == 0) {
                status = llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch.get());
            }
        } catch (const std::exception &) {
            status = kDecodeThrew;
        }
        std::vector<const float *> logits(n, nullptr);
        if (status == 0) {
            const size_t n_vocab = static_cast<size_t>(first.model_->n_vocab());
            for (size_t i = 0; i < n; ++i) {
                if (out_index[i] < 0) {
                    continue;
                }
                logits[i] = llama_get_logits_ith(ctx, out_index[i]);
                if (logits[i] == nullptr) {
                    status = -1;
                } else if (!all_finite(logits[i], n_vocab)) {
                    status = kDecodeNonFinite;
                }
            }
        }
        if (status != 0) {
            // Each token went one cell past its timeline: dropping those cells puts every KV cache back.
            for (size_t i = 0; i < n; ++i) {
                if (out_index[i] >= 0 && shared.ctx) {
                    llama_memory_seq_rm(llama_get_memory(ctx), sessions[i]->seq_, pos[i], -1);
                }
            }
            put_back_samplers();
            if (status == 2) {
                throw CancelledError("a slot was closed during the batched step; every slot is as it was");
            }
            throw Error(status == kDecodeNonFinite ? std::string(kNonFiniteLogits)
                                                   : "the batched step failed (status " + std::to_string(status) +
                                                         "); every slot is as it was before the call");
        }
        for (size_t i = 0; i < n; ++i) {
            if (out_index[i] >= 0) {
                sessions[i]->accept_locked(steps[i], logits[i]);
            }
        }
    }
    return steps;
}

std::string Session::flush_generation() {
    std::lock_guard<std::mutex> lock(shared_->mutex);
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
    std::lock_guard<std::mutex> lock(shared_->mutex);
    check_open();
    std::string kv(llama_state_seq_get_size(ctx(), seq_), '\0');
    const size_t n = llama_state_seq_get_data(ctx(), reinterpret_cast<uint8_t *>(kv.data()), kv.size(), seq_);
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
    std::lock_guard<std::mutex> lock(shared_->mutex);
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
        cells += (c.kind == ChunkKind::Text ? static_cast<long long>(c.tokens.size()) : c.media->n_tokens);
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
        if (!kv.empty() && llama_state_seq_set_data(ctx(), reinterpret_cast<const uint8_t *>(kv.data()),
                                                    kv.size(), seq_) == 0) {
            throw Error(shared_->n_seq > 1
                            ? "the saved KV cache does not fit this pool's context (a slot's state loads into "
                              "pools of the same number of slots, a session's into sessions)"
                            : "the saved KV cache does not fit this model or context (a state saved from a pool "
                              "slot loads only into pools of the same number of slots)");
        }
        registry_->restore(std::move(snap), llama_model_n_embd_inp(model_->llama()));
    } catch (...) {
        registry_->clear();
        throw;
    }
    // Later edits and other sessions reuse the restored embeddings.
    for (const auto & c : registry_->timeline()) {
        if (is_media(c.kind) && !model_->embedding_cache().peek(c.media->digest)) {
            model_->embedding_cache().put(c.media);
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
