#include "image_embed_registry.h"

#include <algorithm>
#include <new>
#include <string>

#include "decode.h"
#include "errors.h"
#include "image_embed_registry_detail.h"
#include "session_state.h"
#include "llama-cpp.h"

namespace llava_kv {

using registry_detail::last_text_token;
using registry_detail::Restoring;

ImageEmbedRegistry::ImageEmbedRegistry(llama_context * ctx, llama_seq_id seq, llama_seq_id parking,
                                       mtmd_context * projector, const llama_vocab * vocab, int32_t n_ctx,
                                       int32_t n_batch, int32_t n_ubatch, CancelState & cancel,
                                       RegistryCounters & counters)
    : ctx_(ctx),
      seq_(seq),
      parking_(parking),
      n_swa_(llama_model_n_swa(llama_get_model(ctx))),
      projector_(projector),
      vocab_(vocab),
      n_batch_(n_batch),
      n_ubatch_(n_ubatch),
      n_ctx_(n_ctx),
      add_bos_(llama_vocab_get_add_bos(vocab)),
      bos_(llama_vocab_bos(vocab)),
      cancel_(cancel),
      counters_(counters) {}

std::string ImageEmbedRegistry::failure(int32_t status) const {
    switch (status) {
        case 1: return "no KV cache slot for the batch (the context is full)";
        case 2: return "cancelled";
        case -1: return "invalid batch";
        case kDecodeThrew: return "an internal error (" + exception_what_ + ")";
        case kDecodeNonFinite: return kNonFiniteLogits;
        default: return "llama_decode failed with status " + std::to_string(status);
    }
}

void ImageEmbedRegistry::roll_back(int32_t status, size_t first, const std::vector<float> & old_logits,
                                   bool old_has_logits) {
    if (cancel_.closing.load()) {
        // The session is being closed and its state freed: restoring it would only delay close().
        drop_state({});
    }
    int32_t restored = -1;
    {
        Restoring restoring(cancel_);
        const llama_pos restore_from = first < timeline_.size() ? timeline_[first].pos0 : n_past();
        restored = remove_kv_from(restore_from) ? decode_from(timeline_, first, true) : -1;
        if (restored != 0 && !cancel_.closing.load()) {
            reset_kv();
            restored = decode_from(timeline_, 0, true);
        }
    }
    if (restored != 0) {
        drop_state("decoding failed (" + failure(status) + ") and the previous state could not be rebuilt (" +
                   failure(restored) + "); the session was reset to empty");
    }
    restored_state(status, old_logits, old_has_logits);
}

void ImageEmbedRegistry::drop_state(const std::string & why) {
    reset_kv();
    timeline_.clear();
    has_logits_ = false;
    approx_from_ = -1;
    cells_restored_ = false;
    if (cancel_.closing.load()) {
        throw ClosedError("the session was closed while the call was running");
    }
    throw Error(why);
}

void ImageEmbedRegistry::restored_state(int32_t status, const std::vector<float> & old_logits, bool old_has_logits) {
    logits_ = old_logits;
    has_logits_ = old_has_logits;
    if (status == 2) {
        throw CancelledError("the call was cancelled; the session is as it was before the call");
    }
    throw Error("decoding failed: " + failure(status) + "; the session is as it was before the call");
}

int32_t ImageEmbedRegistry::n_cells() const {
    int32_t total = 0;
    for (const auto & c : timeline_) {
        total += c.n_cells;
    }
    return total;
}

size_t ImageEmbedRegistry::index_of(uint64_t id) const {
    for (size_t i = 0; i < timeline_.size(); ++i) {
        if (timeline_[i].id == id) {
            return i;
        }
    }
    throw NotFoundError("chunk " + std::to_string(id) + " is not part of this session any more");
}

void ImageEmbedRegistry::layout(std::vector<Chunk> & timeline, bool add_bos, size_t from) {
    llama_pos pos = from == 0 ? 0 : timeline[from - 1].pos1;
    for (size_t i = from; i < timeline.size(); ++i) {
        Chunk & c = timeline[i];
        c.bos = add_bos && i == 0;
        const int32_t extra = c.bos ? 1 : 0;
        const llama_pos n_pos = c.kind == ChunkKind::Text ? static_cast<llama_pos>(c.tokens.size()) : c.media->n_pos;
        c.n_cells = extra + c.n_content_tokens();
        c.pos0 = pos;
        c.pos1 = pos + extra + n_pos;
        pos = c.pos1;
    }
}

std::vector<Chunk> ImageEmbedRegistry::build(size_t begin, size_t end, std::vector<ChunkSpec> & inserted,
                                             std::vector<uint64_t> & ids) const {
    std::vector<Chunk> out;
    out.reserve(timeline_.size() - (end - begin) + inserted.size());
    out.insert(out.end(), timeline_.begin(), timeline_.begin() + begin);
    uint64_t next = next_id_;
    for (auto & spec : inserted) {
        Chunk c;
        c.id = next++;
        c.kind = spec.kind;
        c.tokens = std::move(spec.tokens);
        c.media = std::move(spec.media);
        c.source = std::move(spec.source);
        ids.push_back(c.id);
        out.push_back(std::move(c));
    }
    out.insert(out.end(), timeline_.begin() + end, timeline_.end());
    layout(out, add_bos_, 0);
    return out;
}

void ImageEmbedRegistry::check_fits(const std::vector<Chunk> & timeline) const {
    long long needed = 0;
    for (const auto & c : timeline) {
        needed += c.n_cells;
    }
    if (needed > n_ctx_) {
        throw ContextFullError(needed, n_ctx_,
                               "the timeline needs " + std::to_string(needed) + " KV cells but the context holds " +
                                   std::to_string(n_ctx_) +
                                   "; open the session with a larger n_ctx or remove chunks first");
    }
}

std::vector<uint64_t> ImageEmbedRegistry::splice(size_t begin, size_t end, std::vector<ChunkSpec> inserted) {
    if (begin > end || end > timeline_.size()) {
        throw std::out_of_range("chunk range [" + std::to_string(begin) + ", " + std::to_string(end) +
                                ") is outside the timeline of " + std::to_string(timeline_.size()) + " chunks");
    }
    if (begin == end && inserted.empty()) {
        return {};
    }
    for (const auto & spec : inserted) {
        if (is_media(spec.kind)) {
            const std::string problem = image_batch_problem(projector_, *spec.media, std::min(n_batch_, n_ubatch_));
            if (!problem.empty()) {
                throw Error(problem);
            }
        }
    }
    std::vector<uint64_t> ids;
    std::vector<Chunk> next = build(begin, end, inserted, ids);
    commit(std::move(next), begin);
    next_id_ += ids.size();
    return ids;
}

void ImageEmbedRegistry::remove(std::vector<size_t> indices) {
    if (indices.empty()) {
        return;
    }
    std::sort(indices.begin(), indices.end());
    indices.erase(std::unique(indices.begin(), indices.end()), indices.end());
    if (indices.back() >= timeline_.size()) {
        throw std::out_of_range("chunk index " + std::to_string(indices.back()) + " is outside the timeline of " +
                                std::to_string(timeline_.size()) + " chunks");
    }
    std::vector<Chunk> next;
    next.reserve(timeline_.size() - indices.size());
    size_t k = 0;
    for (size_t i = 0; i < timeline_.size(); ++i) {
        if (k < indices.size() && indices[k] == i) {
            ++k;
            continue;
        }
        next.push_back(timeline_[i]);
    }
    layout(next, add_bos_, 0);
    commit(std::move(next), indices.front());
}

void ImageEmbedRegistry::commit(std::vector<Chunk> next, size_t begin) {
    check_fits(next);

    // The first chunk whose KV changes. A pure truncation re-decodes the new last chunk when it ends
    // in text, so that the logits are those of a fresh run (one ending in image tokens has none).
    size_t first = begin;
    llama_token unused = 0;
    if (first == next.size() && first > 0 && last_text_token(next.back(), bos_, unused)) {
        first -= 1;
    }
    const llama_pos cut = first < timeline_.size() ? timeline_[first].pos0 : n_past();
    int32_t removed = 0;
    for (size_t i = first; i < timeline_.size(); ++i) {
        removed += timeline_[i].n_cells;
    }

    const std::vector<float> old_logits = logits_;
    const bool old_has_logits = has_logits_;
    if (cells_missing_from(cut - n_swa_) || !remove_kv_from(cut)) {
        // Some memories (recurrent, hybrid) cannot drop a suffix, and a loaded sliding-window state
        // lacks the cells before the cut the window would read: rebuild from the start instead.
        reset_kv();
        removed = n_cells();
        first = 0;
        counters_.full_redecodes += 1;
    }
    counters_.kv_cells_removed += static_cast<uint64_t>(removed);

    const int32_t status = decode_from(next, first);
    if (status != 0) {
        roll_back(status, first, old_logits, old_has_logits);
    }
    decoded_whole(next, first);
    timeline_ = std::move(next);
    if (static_cast<int64_t>(first) <= approx_from_) {
        approx_from_ = -1;  // everything from before the first approximate chunk was decoded again
    }
}

llama_pos ImageEmbedRegistry::next_generated_pos() const {
    if (timeline_.empty()) {
        throw Error("nothing to continue: the session is empty");
    }
    const int32_t needed = n_cells() + 1;
    if (needed > n_ctx_) {
        throw ContextFullError(needed, n_ctx_,
                               "generation needs " + std::to_string(needed) + " KV cells but the context holds " +
                                   std::to_string(n_ctx_) + "; open the session with a larger n_ctx");
    }
    return n_past();
}

void ImageEmbedRegistry::append_generated(llama_token token, const std::string & piece) {
    const llama_pos pos = next_generated_pos();
    const std::vector<float> old_logits = logits_;
    const int32_t status = decode_status([&] { return decode_text(&token, 1, pos, true); }, &exception_what_);
    if (status != 0) {
        // One token past the timeline: dropping its cell puts the KV cache back.
        remove_kv_from(pos);
        logits_ = old_logits;
        has_logits_ = true;
        if (status == 2) {
            throw CancelledError(cancel_.closing.load() ? "the session was closed while generating"
                                                        : "generation was cancelled; the session is as it was");
        }
        throw Error("decoding failed: " + failure(status) + "; the session is as it was before the call");
    }
    push_generated(token, piece, true);
}

void ImageEmbedRegistry::accept_generated(llama_token token, const std::string & piece, const float * logits) {
    const size_t n_vocab = static_cast<size_t>(llama_vocab_n_tokens(vocab_));
    logits_.assign(logits, logits + n_vocab);
    has_logits_ = true;
    counters_.decode_calls += 1;
    counters_.tokens_decoded += 1;
    counters_.text_tokens_decoded += 1;
    push_generated(token, piece, false);  // decoded in a batch with other slots: not reproducible alone
}

void ImageEmbedRegistry::push_generated(llama_token token, const std::string & piece, bool per_token) {
    // A chunk's cells come from one kind of decode: a token decoded the other way starts a new chunk.
    if (!timeline_.back().generated || timeline_.back().per_token != per_token) {
        Chunk c;
        c.id = next_id_++;
        c.kind = ChunkKind::Text;
        c.generated = true;
        c.per_token = per_token;
        timeline_.push_back(std::move(c));
    }
    Chunk & c = timeline_.back();
    c.tokens.push_back(token);
    c.source += piece;
    layout(timeline_, add_bos_, timeline_.size() - 1);
}

RegistrySnapshot ImageEmbedRegistry::snapshot() const {
    RegistrySnapshot snap;
    snap.timeline = timeline_;
    snap.next_id = next_id_;
    snap.logits = logits_;
    snap.has_logits = has_logits_;
    snap.approx_from = approx_from_;
    return snap;
}

void ImageEmbedRegistry::restore(RegistrySnapshot snap, int32_t n_embd_inp) {
    for (const auto & c : snap.timeline) {
        if (!is_media(c.kind)) {
            continue;
        }
        for (size_t j = 0; j < c.media->chunks.size(); ++j) {
            const size_t n = mtmd_input_chunk_get_n_tokens(c.media->chunks[j].get());
            const bool text = mtmd_input_chunk_get_type(c.media->chunks[j].get()) == MTMD_INPUT_CHUNK_TYPE_TEXT;
            if (!text && c.media->embeddings[j].size() != n * static_cast<size_t>(n_embd_inp)) {
                throw Error("the saved image embeddings do not fit this model (width differs)");
            }
        }
    }
    if (snap.has_logits && snap.logits.size() != static_cast<size_t>(llama_vocab_n_tokens(vocab_))) {
        throw Error("the saved logits do not fit this model's vocabulary");
    }
    layout(snap.timeline, add_bos_, 0);
    check_fits(snap.timeline);
    timeline_ = std::move(snap.timeline);
    next_id_ = snap.next_id;
    logits_ = std::move(snap.logits);
    has_logits_ = snap.has_logits;
    approx_from_ = snap.approx_from < static_cast<int64_t>(timeline_.size()) ? snap.approx_from : -1;
    cells_restored_ = true;
}

void ImageEmbedRegistry::clear() {
    counters_.kv_cells_removed += static_cast<uint64_t>(n_cells());
    reset_kv();
    timeline_.clear();
    logits_.clear();
    has_logits_ = false;
    approx_from_ = -1;
    cells_restored_ = false;
}

bool ImageEmbedRegistry::remove_kv_from(llama_pos pos0) {
    return llama_memory_seq_rm(llama_get_memory(ctx_), seq_, pos0, -1);
}

void ImageEmbedRegistry::reset_kv() {
    // A context of its own is emptied whole, so the next decode lays its cells out as a fresh run's;
    // a sequence of a shared context removes just its own cells.
    if (parking_ >= 0) {
        llama_memory_clear(llama_get_memory(ctx_), true);
    } else {
        llama_memory_seq_rm(llama_get_memory(ctx_), seq_, -1, -1);
    }
}

int32_t ImageEmbedRegistry::decode_from(const std::vector<Chunk> & timeline, size_t from, bool as_before) {
    has_logits_ = false;
    for (size_t i = from; i < timeline.size(); ++i) {
        const int32_t status = decode_status(
            [&] { return decode_chunk(timeline[i], i + 1 == timeline.size(), as_before); }, &exception_what_);
        if (status != 0) {
            has_logits_ = false;
            return status;
        }
    }
    return 0;
}

int32_t ImageEmbedRegistry::decode_text(const llama_token * tokens, size_t n, llama_pos pos, bool logits_last) {
    if (const int32_t status = fault_point()) {
        return status;
    }
    DecodeCounts counts;
    const int32_t status = llava_kv::decode_text(ctx_, tokens, n, pos, seq_, n_batch_, logits_last, counts);
    return record(counts, status);
}

int32_t ImageEmbedRegistry::record(const DecodeCounts & counts, int32_t status) {
    counters_.decode_calls += counts.calls;
    counters_.tokens_decoded += counts.text_tokens + counts.image_tokens;
    counters_.text_tokens_decoded += counts.text_tokens;
    counters_.image_tokens_decoded += counts.image_tokens;
    if (status != 0 || !counts.logits) {
        return status;
    }
    const float * logits = llama_get_logits_ith(ctx_, -1);
    if (logits == nullptr) {
        return -1;
    }
    const size_t n_vocab = static_cast<size_t>(llama_vocab_n_tokens(vocab_));
    if (!all_finite(logits, n_vocab)) {
        return kDecodeNonFinite;
    }
    logits_.assign(logits, logits + n_vocab);
    has_logits_ = true;
    return 0;
}

int32_t ImageEmbedRegistry::fault_point() {
    switch (take_decode_fault()) {
        case DecodeFault::Status: return -3;
        case DecodeFault::Exception: throw std::bad_alloc();
        case DecodeFault::Cancel: cancel_.cancel.store(true); break;  // the decode that follows is aborted for real
        case DecodeFault::Close: cancel_.closing.store(true); break;
        case DecodeFault::Pause: pause_decode(); break;
        case DecodeFault::None: break;
    }
    return 0;
}

void ImageEmbedRegistry::decoded_whole(std::vector<Chunk> & timeline, size_t from) {
    for (size_t i = from; i < timeline.size(); ++i) {
        timeline[i].per_token = false;
    }
}

int32_t ImageEmbedRegistry::decode_chunk(const Chunk & chunk, bool logits_last, bool as_before) {
    llama_pos pos = chunk.pos0;
    if (as_before && chunk.per_token && !chunk.bos) {
        for (size_t i = 0; i < chunk.tokens.size(); ++i) {
            const bool last = logits_last && i + 1 == chunk.tokens.size();
            if (const int32_t status = decode_text(&chunk.tokens[i], 1, pos + static_cast<llama_pos>(i), last)) {
                return status;
            }
        }
        return 0;
    }
    if (chunk.kind == ChunkKind::Text) {
        if (!chunk.bos) {
            return decode_text(chunk.tokens.data(), chunk.tokens.size(), pos, logits_last);
        }
        std::vector<llama_token> with_bos;
        with_bos.reserve(chunk.tokens.size() + 1);
        with_bos.push_back(bos_);
        with_bos.insert(with_bos.end(), chunk.tokens.begin(), chunk.tokens.end());
        return decode_text(with_bos.data(), with_bos.size(), pos, logits_last);
    }
    if (chunk.bos) {
        // As mtmd does for a prompt that starts with an image: BOS as a text chunk of its own.
        const int32_t status = decode_text(&bos_, 1, pos, false);
        if (status != 0) {
            return status;
        }
        pos += 1;
    }
    if (const int32_t status = fault_point()) {
        return status;
    }
    DecodeCounts counts;
    const int32_t status =
        record(counts, decode_image(projector_, ctx_, *chunk.media, pos, seq_, n_batch_, logits_last, counts));
    if (status != 0) {
        return status;
    }
    counters_.images_decoded += 1;
    return 0;
}

}  // namespace llava_kv
