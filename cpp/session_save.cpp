// Session's save and load: the whole conversation (timeline, embeddings, KV cells, sampler seed) as
// one blob in the format of session_state.h.
#include "errors.h"
#include "runtime.h"
#include "session.h"
#include "session_state.h"

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
    return serialize_state(provenance(header, *model_), registry_->snapshot(), kv);
}

StateHeader provenance(StateHeader header, const Model & model) {
    header.llama_cpp_commit = llama_cpp_commit();
    header.kv_type = kv_type_name(model.params());
    header.placement = model.placement();
    header.cpu_variant = cpu_variant();
    return header;
}

void Session::load_state(const std::string & blob, bool allow_drift) {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(shared_->mutex);
    check_open();
    if (!registry_->timeline().empty()) {
        throw Error("load_state needs an empty session");
    }
    // Everything is checked against this model and context before llama.cpp reads a byte of it.
    const StateHeader header = inspect_state(blob);
    check_state_fits(header, *model_);
    // KV cells computed elsewhere are valid but not what a fresh run here computes: loaded only when
    // asked, and then marked approximate (recompute() makes the session exact again).
    const std::string drift = provenance_difference(header, provenance(header, *model_));
    if (!drift.empty() && !allow_drift) {
        throw Error("the saved session's KV cache would not equal a fresh run here: " + drift +
                    ". Load it with allow_drift=True (the session is then approximate until recompute()), "
                    "or rebuild the conversation");
    }
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
        if (!drift.empty() && !snap.timeline.empty()) {
            snap.approx_from = 0;
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
    const std::string kv_type = kv_type_name(model.params());
    if (!header.kv_type.empty() && header.kv_type != kv_type) {
        throw Error("the saved session has a " + header.kv_type + " KV cache and this model's is " + kv_type +
                    ": load the model with kv_type='" + header.kv_type + "'");
    }
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
