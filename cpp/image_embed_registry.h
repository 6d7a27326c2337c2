// One conversation's timeline: ordered chunks (text tokens, or one image or audio clip) with their KV spans. The
// registry is the only writer of the session's KV cache, so timeline, embeddings and KV cannot
// drift apart: every edit leaves all three consistent, or all three as they were.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "chunk_kind.h"
#include "embedding_cache.h"
#include "llama.h"
#include "mtmd.h"

namespace llava_kv {

struct Chunk {
    uint64_t id = 0;
    ChunkKind kind = ChunkKind::Text;
    std::vector<llama_token> tokens;               // text
    std::shared_ptr<const MediaEmbedding> media;  // an image or audio clip
    std::string source;                            // what the user passed: the text, or the media's path/description
    bool generated = false;  // tokens the model sampled, not text given to us
    // Its KV cells came from one decode call per token (a lone session's generation), not from one
    // decode of the chunk: a rollback decodes it again that way, since the two round differently.
    bool per_token = false;
    // Derived by layout(): chunk 0 also carries the BOS token when the vocabulary wants one.
    bool bos = false;
    llama_pos pos0 = 0;
    llama_pos pos1 = 0;
    int32_t n_cells = 0;  // KV cells taken (tokens decoded), >= pos1 - pos0 under M-RoPE

    int32_t n_content_tokens() const {
        return kind == ChunkKind::Text ? static_cast<int32_t>(tokens.size()) : media->n_tokens;
    }
};

// What a chunk is made from before it joins the timeline.
struct ChunkSpec {
    ChunkKind kind = ChunkKind::Text;
    std::vector<llama_token> tokens;
    std::shared_ptr<const MediaEmbedding> media;
    std::string source;
};

struct RegistryCounters {
    uint64_t tokens_decoded = 0;        // text + image tokens written into the KV cache
    uint64_t text_tokens_decoded = 0;
    uint64_t image_tokens_decoded = 0;
    uint64_t images_decoded = 0;        // image chunks written into the KV cache (from embeddings)
    uint64_t kv_cells_removed = 0;
    uint64_t decode_calls = 0;
    uint64_t full_redecodes = 0;        // edits where the memory refused a partial removal
    uint64_t shift_edits = 0;
    uint64_t blend_edits = 0;
    uint64_t blend_tokens_kept = 0;     // KV cells of later chunks blend edits kept instead of decoding
};

// What one blend edit did: tokens decoded, KV cells of later chunks kept as they were, what the exact
// edit would have decoded, and how many leading tokens of each later image were recomputed.
struct BlendReport {
    int32_t tokens_decoded = 0;
    int32_t tokens_kept = 0;
    int32_t exact_tokens = 0;
    int32_t k = 0;          // asked for
    int32_t k_applied = 0;  // what the cache allows: 0 under M-RoPE (an image's cells share one position)
    bool exact_fallback = false;  // done as an exact edit: a loaded sliding-window state lacks the cells to keep
};

struct CancelState;       // decode.h
struct DecodeCounts;      // decode.h
struct RegistrySnapshot;  // session_state.h

class ImageEmbedRegistry {
  public:
    // `n_ctx` is the capacity edits are checked against (what the user asked for, not llama.cpp's
    // padded size); `n_batch`/`n_ubatch` are the context's own. `cancel` is the owner's: a rollback
    // holds off cancel() while it restores, and after close() the state is dropped, not restored.
    // `seq` is the sequence of `ctx` this timeline owns (0 for a context of its own; a slot's in a
    // shared one): every decode and removal touches that sequence only. `parking` (a context of its
    // own: 1; a pool slot: -1) and the one after it are empty sequences of the same cell buffer where
    // a blend edit parks the cells it keeps while it decodes what comes before them.
    ImageEmbedRegistry(llama_context * ctx, llama_seq_id seq, llama_seq_id parking, mtmd_context * projector,
                       const llama_vocab * vocab, int32_t n_ctx, int32_t n_batch, int32_t n_ubatch,
                       CancelState & cancel, RegistryCounters & counters);

    const std::vector<Chunk> & timeline() const { return timeline_; }
    llama_pos n_past() const { return timeline_.empty() ? 0 : timeline_.back().pos1; }
    int32_t n_cells() const;
    bool has_logits() const { return has_logits_; }
    const std::vector<float> & logits() const { return logits_; }

    // Index of the chunk with this id; throws NotFoundError.
    size_t index_of(uint64_t id) const;

    // Replaces chunks [begin, end) with `inserted` (exact semantics): KV is removed from the first
    // changed chunk's pos0 and the new suffix is decoded with the same batch splits a fresh run uses.
    // Returns the ids given to the inserted chunks. On failure nothing has changed.
    std::vector<uint64_t> splice(size_t begin, size_t end, std::vector<ChunkSpec> inserted);

    // Removes the chunks at `indices` in one exact edit (re-decoding from the first of them).
    void remove(std::vector<size_t> indices);

    // Removes one chunk by deleting its KV span and shifting later positions down, without
    // re-decoding (approximate). Throws Error where the memory cannot shift or positions are M-RoPE.
    void remove_shift(size_t index);

    // The approximate splice (mode='blend'): the inserted chunks are decoded after the exact prefix;
    // of every later chunk the text (and each image's marker tokens) is decoded again, and of each
    // image only its first `k` tokens, the rest keeping the KV cells computed before the edit. Later
    // positions move (a KV shift) only where the memory can shift: else the edit must keep the token
    // count. llama.cpp decodes a sequence only at its end, so the kept cells wait in the parking
    // sequence and return chunk by chunk; a pool slot has none (refused). On failure nothing has changed.
    // Sliding-window models are refused unless `allow_drift` (see README: measured drift too large).
    std::vector<uint64_t> splice_blend(size_t begin, size_t end, std::vector<ChunkSpec> inserted, int32_t k,
                                       bool allow_drift, BlendReport & report);

    // Whether every KV cell is what a fresh run computes (false after a blend or shift edit, until an
    // exact edit from before the first approximate chunk, recompute() or clear()).
    bool exact() const { return approx_from_ < 0; }
    // Index of the first chunk whose KV is approximate (-1 when exact).
    int64_t approx_from() const { return approx_from_; }
    // Re-decodes from the first approximate chunk, after which logits equal a fresh run's. Returns
    // the tokens decoded (0 when already exact). On failure nothing has changed.
    int32_t recompute();

    // Decodes one sampled token after the timeline and records it in the trailing generated chunk
    // (a new one if the last chunk is not generated). On failure nothing has changed.
    void append_generated(llama_token token, const std::string & piece);

    // For a batched step that decodes the next token of several sequences in one call (SessionPool):
    // where this sequence's next token goes (throws if there is no room or nothing to continue), and
    // recording a token the step decoded there with its logits. The step removes the cells of
    // every sequence again if the decode fails, so nothing is recorded then.
    llama_pos next_generated_pos() const;
    void accept_generated(llama_token token, const std::string & piece, const float * logits);
    llama_seq_id seq() const { return seq_; }

    // The timeline, ids and logits (not the KV cache), and putting them back after the KV cache
    // was restored to match. restore() checks sizes and embedding widths against this context.
    RegistrySnapshot snapshot() const;
    void restore(RegistrySnapshot snapshot, int32_t n_embd_inp);

    // Empties the timeline and the KV cache.
    void clear();

  private:
    std::vector<Chunk> build(size_t begin, size_t end, std::vector<ChunkSpec> & inserted,
                             std::vector<uint64_t> & ids) const;
    // Makes `next` (equal to the current timeline before index `first`) the timeline: removes the
    // KV cache from there and decodes the rest, or restores everything and throws.
    void commit(std::vector<Chunk> next, size_t first);
    static void layout(std::vector<Chunk> & timeline, bool add_bos, size_t from);
    void check_fits(const std::vector<Chunk> & timeline) const;
    // Decodes timeline[from:] into the KV cache; returns llama's status (0 = ok) or one of ours
    // (decode.h): a C++ exception is caught here and reported as kDecodeThrew.
    // `as_before` (a rollback): chunks marked per_token are decoded one token per call, as their
    // cells were made; otherwise each chunk is one decode (and the caller clears the marks).
    int32_t decode_from(const std::vector<Chunk> & timeline, size_t from, bool as_before = false);
    // The chunks from `from` on were decoded whole: their cells no longer come from per-token calls.
    static void decoded_whole(std::vector<Chunk> & timeline, size_t from);
    // After a failed decode of `status`: puts the KV cache back to the current timeline (from chunk
    // `first` on) and throws the error the call ends with. Never returns.
    [[noreturn]] void roll_back(int32_t status, size_t first, const std::vector<float> & old_logits,
                                bool old_has_logits);
    // After a failed call: the state could not be put back (or the session is closing), so it is
    // dropped and the session left empty (ClosedError when closing, else Error(why)); or it is back,
    // and so are its logits (CancelledError or Error naming `status`).
    [[noreturn]] void drop_state(const std::string & why);
    [[noreturn]] void restored_state(int32_t status, const std::vector<float> & old_logits, bool old_has_logits);
    std::string failure(int32_t status) const;
    int32_t decode_text(const llama_token * tokens, size_t n, llama_pos pos0, bool logits_last);
    int32_t decode_chunk(const Chunk & chunk, bool logits_last, bool as_before = false);
    // Where the test-only fault hook (decode.h) strikes: before every text or image decode call.
    int32_t fault_point();
    // Adds a decode call's work to the counters and keeps its logits if it asked for them; returns
    // `status`, or -1 if the logits it asked for are missing.
    int32_t record(const DecodeCounts & counts, int32_t status);
    bool remove_kv_from(llama_pos pos0);
    void reset_kv();

    void push_generated(llama_token token, const std::string & piece, bool per_token);
    // Why positions after an edit cannot move in this memory (empty if they can).
    std::string shift_problem() const;
    // A later chunk of a blend edit: its text decoded again, of a media chunk the first `k` tokens
    // of each image part, the rest of its cells brought back from the parking sequence; `kept` adds
    // those.
    int32_t blend_chunk(const Chunk & chunk, int32_t k, bool logits_last, int32_t & kept);
    void mark_approximate(size_t from);
    // Moving cells at positions [p0, p1) of this sequence into the parking sequences, and out of them
    // (back into this sequence, or dropped).
    void park(llama_pos p0, llama_pos p1);
    void unpark(llama_pos p0, llama_pos p1, bool back);
    // Whether a sliding-window cache lacks cells at positions >= `pos`: a loaded state holds only the
    // cells of each window (llama.cpp saves no others), so an edit that reads further back than that,
    // or keeps cells from there, must decode from the start.
    bool cells_missing_from(llama_pos pos) const;
    // This sequence's KV cells, and putting them back after a failed approximate edit (then throws
    // the error the call ends with, as roll_back does).
    std::vector<uint8_t> copy_kv() const;
    [[noreturn]] void put_back(const std::vector<uint8_t> & saved, int32_t status, const std::vector<float> & old_logits,
                               bool old_has_logits);

    llama_context * ctx_;
    llama_seq_id seq_;
    llama_seq_id parking_;
    int32_t n_swa_;  // the sliding window (0: none)
    mtmd_context * projector_;
    const llama_vocab * vocab_;
    int32_t n_batch_;
    int32_t n_ubatch_;
    int32_t n_ctx_ = 0;
    bool add_bos_;
    llama_token bos_;
    CancelState & cancel_;
    RegistryCounters & counters_;
    std::string exception_what_;  // what the last kDecodeThrew caught

    std::vector<Chunk> timeline_;
    uint64_t next_id_ = 1;
    std::vector<float> logits_;
    bool has_logits_ = false;
    int64_t approx_from_ = -1;
    // The cells were put back from a copy (a failed approximate edit, a loaded state): their layout
    // in the cache may differ from a fresh run's, so recompute() decodes from the start.
    bool cells_restored_ = false;
};

}  // namespace llava_kv
