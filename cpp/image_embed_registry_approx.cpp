// ImageEmbedRegistry's approximate edits: removal by position shift, blend edits (later images keep
// most of their KV cells, parked in a second sequence while the prefix is redone), and recompute(),
// which makes an approximate timeline exact again. The exact edits are in image_embed_registry.cpp.
#include <algorithm>
#include <string>

#include "decode.h"
#include "errors.h"
#include "image_embed_registry.h"
#include "image_embed_registry_detail.h"
#include "llama-cpp.h"

namespace llava_kv {

using registry_detail::last_text_token;
using registry_detail::Restoring;

void ImageEmbedRegistry::remove_shift(size_t index) {
    if (index >= timeline_.size()) {
        throw std::out_of_range("chunk index " + std::to_string(index) + " is outside the timeline");
    }
    if (const std::string problem = shift_problem(); !problem.empty()) {
        throw Error("mode='shift' is not available: " + problem + "; use mode='exact'");
    }
    llama_memory_t mem = llama_get_memory(ctx_);
    if (index == 0 && timeline_[0].bos) {
        throw Error("mode='shift' cannot remove the first chunk, which carries the BOS token; use mode='exact'");
    }
    if (index + 1 == timeline_.size()) {
        splice(index, index + 1, {});  // removing the tail is exact and just as cheap
        return;
    }
    const Chunk & gone = timeline_[index];
    const llama_pos p0 = gone.pos0;
    const llama_pos p1 = gone.pos1;
    std::vector<Chunk> next;
    next.reserve(timeline_.size() - 1);
    next.insert(next.end(), timeline_.begin(), timeline_.begin() + index);
    next.insert(next.end(), timeline_.begin() + index + 1, timeline_.end());
    layout(next, add_bos_, index);

    if (!llama_memory_seq_rm(mem, seq_, p0, p1)) {
        throw Error("mode='shift' is not available: this model's KV memory refused to remove a span; use mode='exact'");
    }
    llama_memory_seq_add(mem, seq_, p1, -1, -(p1 - p0));
    counters_.kv_cells_removed += static_cast<uint64_t>(gone.n_cells);
    counters_.shift_edits += 1;

    // Refresh the logits of the (shifted) last token so logits() never reports stale values.
    const std::vector<float> old_logits = logits_;
    const bool old_has_logits = has_logits_;
    const Chunk & last = next.back();
    llama_token token = 0;
    int32_t status = 0;
    has_logits_ = false;
    if (last_text_token(last, bos_, token)) {
        const llama_pos pos = last.pos1 - 1;
        if (!llama_memory_seq_rm(mem, seq_, pos, -1)) {
            status = -1;
        } else {
            counters_.kv_cells_removed += 1;
            status = decode_status([&] { return decode_text(&token, 1, pos, true); }, &exception_what_);
        }
    }
    if (status != 0) {
        // The shift already moved the KV cache: put back the state from before the call by
        // rebuilding it exactly, from the start.
        reset_kv();
        roll_back(status, 0, old_logits, old_has_logits);
    }
    timeline_ = std::move(next);
    mark_approximate(index);
}

std::string ImageEmbedRegistry::shift_problem() const {
    if (projector_ && mtmd_decode_use_mrope(projector_)) {
        return "M-RoPE positions are not a single axis";
    }
    // Sliding-window models: llama.cpp reports that their cache can shift, but applying the shift
    // to the windowed cache aborts the process at the pinned commit. Refuse rather than crash.
    if (n_swa_ > 0) {
        return "this llama.cpp cannot shift the windowed KV cache of sliding-window attention models safely";
    }
    if (!llama_memory_can_shift(llama_get_memory(ctx_))) {
        return "this model's KV memory cannot shift positions";
    }
    return {};
}

void ImageEmbedRegistry::mark_approximate(size_t from) {
    const auto index = static_cast<int64_t>(from);
    approx_from_ = approx_from_ < 0 ? index : std::min(approx_from_, index);
}

void ImageEmbedRegistry::put_back(const std::vector<uint8_t> & saved, int32_t status,
                                  const std::vector<float> & old_logits, bool old_has_logits) {
    {
        Restoring restoring(cancel_);
        llama_memory_seq_rm(llama_get_memory(ctx_), seq_, -1, -1);
        if (cancel_.closing.load() || llama_state_seq_set_data(ctx_, saved.data(), saved.size(), seq_) != saved.size()) {
            drop_state("decoding failed (" + failure(status) +
                       ") and the previous KV cache could not be put back; the session was reset to empty");
        }
    }
    cells_restored_ = true;
    restored_state(status, old_logits, old_has_logits);
}

std::vector<uint8_t> ImageEmbedRegistry::copy_kv() const {
    std::vector<uint8_t> saved(llama_state_seq_get_size(ctx_, seq_));
    if (llama_state_seq_get_data(ctx_, saved.data(), saved.size(), seq_) != saved.size()) {
        throw Error("could not keep a copy of the KV cache to roll back to");
    }
    return saved;
}

std::vector<uint64_t> ImageEmbedRegistry::splice_blend(size_t begin, size_t end, std::vector<ChunkSpec> inserted,
                                                       int32_t k, bool allow_drift, BlendReport & report) {
    if (k < 0) {
        throw std::invalid_argument("k (the leading tokens recomputed of each later image) must be >= 0");
    }
    if (begin > end || end > timeline_.size()) {
        throw std::out_of_range("chunk range [" + std::to_string(begin) + ", " + std::to_string(end) +
                                ") is outside the timeline of " + std::to_string(timeline_.size()) + " chunks");
    }
    if (n_swa_ > 0 && !allow_drift) {
        throw Error("mode='blend' is refused for sliding-window models (Gemma 3): on real Gemma 3 270M weights its "
                    "drift from the exact edit was too large to be useful (top-1 agreement 2 of 3, greedy tokens "
                    "apart after the first; see the README); use mode='exact', or pass allow_drift=True");
    }
    if (parking_ < 0) {
        throw Error("mode='blend' is not available on a slot of a session pool (its context has no sequence to "
                    "park the kept KV cells in); use mode='exact', or a session of its own");
    }
    for (const auto & spec : inserted) {
        if (!is_media(spec.kind)) {
            continue;
        }
        if (const std::string problem = image_batch_problem(projector_, *spec.media, std::min(n_batch_, n_ubatch_));
            !problem.empty()) {
            throw Error(problem);
        }
    }
    report = BlendReport{};
    report.k = k;
    const bool mrope = projector_ && mtmd_decode_use_mrope(projector_);
    report.k_applied = mrope ? 0 : k;

    std::vector<uint64_t> ids;
    std::vector<Chunk> next = build(begin, end, inserted, ids);
    const size_t tail = begin + ids.size();  // the first later chunk in `next`
    for (size_t i = begin; i < next.size(); ++i) {
        report.exact_tokens += next[i].n_cells;
    }
    const llama_pos first_kept = end < timeline_.size() ? timeline_[end].pos0 : n_past();
    if (end == timeline_.size() || tail == next.size() || cells_missing_from(timeline_[begin].pos0 - n_swa_) ||
        cells_missing_from(first_kept)) {
        // Nothing after the edit, or a loaded sliding-window state without the cells to keep (llama.cpp
        // saves only each window's): the exact splice is all there is to do.
        report.exact_fallback = end < timeline_.size() && tail < next.size();
        const uint64_t before = counters_.tokens_decoded;
        commit(std::move(next), begin);
        next_id_ += ids.size();
        report.tokens_decoded = static_cast<int32_t>(counters_.tokens_decoded - before);
        return ids;
    }
    check_fits(next);
    const llama_pos cut = timeline_[begin].pos0;
    const llama_pos old_tail = timeline_[end].pos0;
    const llama_pos delta = next[tail].pos0 - old_tail;
    if (delta != 0) {
        if (const std::string problem = shift_problem(); !problem.empty()) {
            throw Error("mode='blend' here moves what follows by " + std::to_string(delta) + " positions, and " +
                        problem + ": replace with media of the same token count, or use mode='exact'");
        }
    }

    llama_memory_t mem = llama_get_memory(ctx_);
    // An approximate state cannot be decoded back: keep this sequence's cells to put back on failure.
    const std::vector<uint8_t> saved = exact() ? std::vector<uint8_t>() : copy_kv();
    if (cut < old_tail && !llama_memory_seq_rm(mem, seq_, cut, old_tail)) {
        throw Error("mode='blend' is not available: this model's KV memory cannot remove a span from the middle; "
                    "use mode='exact'");
    }
    const std::vector<float> old_logits = logits_;
    const bool old_has_logits = has_logits_;
    const uint64_t decoded_before = counters_.tokens_decoded;
    int32_t removed = 0;
    for (size_t i = begin; i < end; ++i) {
        removed += timeline_[i].n_cells;
    }
    if (delta != 0) {
        llama_memory_seq_add(mem, seq_, old_tail, -1, delta);
    }
    // Everything after the edit waits in the parking sequence (the same cells, no copy): llama.cpp
    // decodes a sequence only at its end, and the kept cells come back chunk by chunk in order.
    park(next[tail].pos0, -1);
    has_logits_ = false;
    int32_t status = 0;
    int32_t kept = 0;
    for (size_t i = begin; i < next.size() && status == 0; ++i) {
        const bool last = i + 1 == next.size();
        status = decode_status(
            [&] { return i < tail ? decode_chunk(next[i], last) : blend_chunk(next[i], report.k_applied, last, kept); },
            &exception_what_);
    }
    unpark(-1, -1, false);  // what is left there was decoded again (or the call failed)
    if (status != 0) {
        if (saved.empty()) {
            // The state before was exact: decode it again from the edit on (what an exact edit's rollback does).
            roll_back(status, begin, old_logits, old_has_logits);
        }
        put_back(saved, status, old_logits, old_has_logits);
    }
    counters_.kv_cells_removed += static_cast<uint64_t>(removed);
    counters_.blend_edits += 1;
    counters_.blend_tokens_kept += static_cast<uint64_t>(kept);
    decoded_whole(next, begin);
    timeline_ = std::move(next);
    next_id_ += ids.size();
    mark_approximate(begin);
    report.tokens_decoded = static_cast<int32_t>(counters_.tokens_decoded - decoded_before);
    report.tokens_kept = kept;
    return ids;
}

void ImageEmbedRegistry::park(llama_pos p0, llama_pos p1) {
    // In two sequences, not one: a sliding-window cache may reuse a cell of a single sequence that
    // lies outside that sequence's window, and a parked cell is far behind the parking sequence's end.
    llama_memory_t mem = llama_get_memory(ctx_);
    llama_memory_seq_cp(mem, seq_, parking_, p0, p1);
    llama_memory_seq_cp(mem, seq_, parking_ + 1, p0, p1);
    llama_memory_seq_rm(mem, seq_, p0, p1);
}

void ImageEmbedRegistry::unpark(llama_pos p0, llama_pos p1, bool back) {
    llama_memory_t mem = llama_get_memory(ctx_);
    if (back) {
        llama_memory_seq_cp(mem, parking_, seq_, p0, p1);
    }
    llama_memory_seq_rm(mem, parking_, p0, p1);
    llama_memory_seq_rm(mem, parking_ + 1, p0, p1);
}

bool ImageEmbedRegistry::cells_missing_from(llama_pos pos) const {
    if (n_swa_ <= 0 || timeline_.empty()) {
        return false;
    }
    return llama_memory_seq_pos_min(llama_get_memory(ctx_), seq_) > std::max<llama_pos>(0, pos);
}

int32_t ImageEmbedRegistry::blend_chunk(const Chunk & chunk, int32_t k, bool logits_last, int32_t & kept) {
    if (chunk.kind == ChunkKind::Text) {
        unpark(chunk.pos0, chunk.pos1, false);
        return decode_chunk(chunk, logits_last);
    }
    llama_pos pos = chunk.pos0;
    const auto & image = *chunk.media;
    for (size_t j = 0; j < image.chunks.size(); ++j) {
        const mtmd_input_chunk * sub = image.chunks[j].get();
        const auto n = static_cast<int32_t>(mtmd_input_chunk_get_n_tokens(sub));
        const llama_pos n_pos = mtmd_input_chunk_get_n_pos(sub);
        if (mtmd_input_chunk_get_type(sub) == MTMD_INPUT_CHUNK_TYPE_TEXT) {
            size_t n_text = 0;
            const llama_token * tokens = mtmd_input_chunk_get_tokens_text(sub, &n_text);
            unpark(pos, pos + n_pos, false);
            if (const int32_t status = decode_text(tokens, n_text, pos, logits_last && j + 1 == image.chunks.size())) {
                return status;
            }
            pos += n_pos;
            continue;
        }
        // k is 0 under M-RoPE (splice_blend): there all of an image's cells share one position.
        const int32_t redo = std::min(k, n);
        if (redo > 0) {
            unpark(pos, pos + redo, false);
            if (const int32_t status = fault_point()) {
                return status;
            }
            DecodeCounts counts;
            const size_t n_embd = image.embeddings[j].size() / static_cast<size_t>(n);
            // As the image was decoded: a projector's non-causal attention within the image stays.
            const bool non_causal = mtmd_decode_use_non_causal(projector_, sub);
            if (non_causal) {
                llama_set_causal_attn(ctx_, false);
            }
            const int32_t decoded = llava_kv::decode_embeddings(ctx_, image.embeddings[j].data(), n_embd,
                                                                static_cast<size_t>(redo), pos, seq_, n_batch_, counts);
            if (non_causal) {
                llama_set_causal_attn(ctx_, true);
            }
            if (const int32_t status = record(counts, decoded)) {
                return status;
            }
        }
        // The rest of the image's cells come back as they were.
        unpark(pos + redo, pos + n_pos, true);
        kept += n - redo;
        pos += n_pos;
    }
    return 0;
}

int32_t ImageEmbedRegistry::recompute() {
    if (exact()) {
        return 0;
    }
    const auto first = static_cast<size_t>(approx_from_);
    const std::vector<uint8_t> saved = copy_kv();
    const std::vector<float> old_logits = logits_;
    const bool old_has_logits = has_logits_;
    const uint64_t before = counters_.tokens_decoded;
    size_t from = first;
    if (cells_restored_ || !remove_kv_from(timeline_[first].pos0)) {
        reset_kv();
        from = 0;
        counters_.full_redecodes += 1;
    }
    const int32_t status = decode_from(timeline_, from);
    if (status != 0) {
        put_back(saved, status, old_logits, old_has_logits);
    }
    decoded_whole(timeline_, from);
    approx_from_ = -1;
    cells_restored_ = false;
    return static_cast<int32_t>(counters_.tokens_decoded - before);
}

}  // namespace llava_kv
