// One conversation: a llama_context, its ImageEmbedRegistry and the counters of work done.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "decode.h"
#include "image_embed_registry.h"
#include "image_encoder.h"
#include "llama-cpp.h"
#include "model.h"
#include "reply.h"
#include "sampling.h"

struct llama_batch_ext;  // llama-ext.h

namespace llava_kv {

struct SessionParams {
    int32_t n_ctx = 4096;
    int32_t n_batch = 512;
    int32_t n_ubatch = 0;  // 0: n_batch
    uint32_t seed = 0;
    int32_t n_threads = 0;  // 0: the model's
};

// One element of an edit: text, or media (an image or an audio clip).
struct ChunkInput {
    ChunkKind kind = ChunkKind::Text;
    std::string text;
    MediaInput media;
};

// What a generation call did, for one session: one step (generate_step, step_together) or several
// (advance, step_until). Text is bytes that became final: whole characters that cannot be the start
// of a stop string still to come, and everything left once the reply has ended.
struct GenerationStep {
    llama_token token = -1;  // the last token accepted (-1: none)
    std::string text;
    int32_t n_tokens = 0;  // tokens accepted by this call
    bool done = false;     // the reply has ended (finish_reason says how)
    bool end_of_generation = false;  // it ended on an end-of-generation token: reported, not decoded
    std::string finish_reason;       // "stop", "length" or "error" once done
    std::string error;               // "error": why the grammar allowed no token
    std::vector<TokenLogprob> logprobs;  // the accepted tokens' entries, where the reply lists them
};

// One of several replies generate_branches() samples from the same timeline.
struct Branch {
    std::string text;  // bytes, cut before a stop string
    int32_t n_tokens = 0;
    std::string finish_reason;  // "stop", "length", or "error" (the grammar allowed no token: `error`)
    std::string error;
};

// Sequences of a session's own context: 0 the timeline, 1 and 2 where a blend edit parks cells,
// then the branches of generate_branches().
constexpr llama_seq_id kFirstBranchSeq = 3;
constexpr int32_t kMaxBranches = 16;

struct ChunkInfo {
    uint64_t id = 0;
    ChunkKind kind = ChunkKind::Text;
    int32_t n_tokens = 0;  // KV cells (for chunk 0 including BOS)
    llama_pos pos0 = 0;
    llama_pos pos1 = 0;
    std::string digest;
    std::string source;  // the text of a text chunk; the media's path or description
    uint32_t width = 0;
    uint32_t height = 0;
    uint64_t n_samples = 0;
    std::vector<llama_token> tokens;  // text chunks (without BOS)
    bool generated = false;
};

struct SessionStats {
    RegistryCounters registry;
    EncodeCounters encode;
    uint64_t tokens_generated = 0;
    uint64_t batched_steps = 0;  // generated tokens decoded in a step shared with other slots (SessionPool)
};

// The llama_context sessions decode into: a session's own (one sequence), or one shared by the slots
// of a pool, a sequence and a KV stream of its own each (kv_unified off, so a slot's cells are laid
// out as in a context of its own and its prefill gives the same logits). One call at a time runs on
// it; the abort callback stops it when a session the call works for is cancelled or closing.
struct SharedContext {
    ContextPtr ctx;
    std::mutex mutex;
    int32_t n_seq = 1;
    std::vector<bool> open;  // slots not yet closed (under mutex)
    // The cancel states of the call in flight, set under mutex by the caller (a Call). A batched
    // step is stopped only by closing: one slot's cancel() must not fail the others' step.
    std::vector<const CancelState *> active;
    bool step = false;

    static bool abort_requested(void * self);

    // Marks whose call runs on the context for the length of one call (under mutex), for the abort
    // callback: an edit or generation of one session, or a batched step of several.
    class Call {
      public:
        Call(SharedContext & shared, std::vector<const CancelState *> states, bool step) : shared_(shared) {
            shared_.active = std::move(states);
            shared_.step = step;
        }
        ~Call() {
            shared_.active.clear();
            shared_.step = false;
        }
        Call(const Call &) = delete;
        Call & operator=(const Call &) = delete;

      private:
        SharedContext & shared_;
    };
};

class Session;

// Opens `n_slots` sessions sharing one context (sequence i in slot i), each holding up to
// `params.n_ctx` cells of its own. The context is freed when the last slot is closed, or with the model.
std::vector<std::shared_ptr<Session>> open_session_pool(const std::shared_ptr<Model> & model,
                                                        const SessionParams & params, int32_t n_slots);

class Session {
  public:
    Session(std::shared_ptr<Model> model, const SessionParams & params);
    // Slot `seq` of a shared context (open_session_pool()).
    Session(std::shared_ptr<Model> model, const SessionParams & params, std::shared_ptr<SharedContext> shared,
            llama_seq_id seq);
    ~Session();
    Session(const Session &) = delete;
    Session & operator=(const Session &) = delete;

    void close();
    bool closed() const { return closed_.load(); }
    // Called by Model::close() while it holds the model exclusively.
    void close_for_model();
    // Called by Model::close() before it waits for calls in flight: they stop at their next decode
    // step and drop their state instead of restoring it.
    void begin_close() { cancel_.closing.store(true); }
    bool closing() const { return cancel_.closing.load(); }

    // Replaces chunks [begin, end) with `inputs` (exact). Returns the new chunks' ids (empty text
    // makes no chunk). On any failure the session is exactly as before the call.
    std::vector<uint64_t> splice(size_t begin, size_t end, const std::vector<ChunkInput> & inputs);
    void remove_shift(uint64_t chunk_id);
    // The approximate splice (mode='blend', ImageEmbedRegistry::splice_blend): fills `report`.
    std::vector<uint64_t> splice_blend(size_t begin, size_t end, const std::vector<ChunkInput> & inputs, int32_t k,
                                       bool allow_drift, BlendReport & report);
    // Whether the KV cache is what a fresh run computes, and making it so (returns tokens decoded).
    bool exact() const;
    int32_t recompute();
    // Removes these chunks in one exact edit. Throws NotFoundError (nothing changed) for an unknown id.
    void remove_chunks(const std::vector<uint64_t> & chunk_ids);
    size_t index_of(uint64_t chunk_id) const;
    void clear();

    std::vector<ChunkInfo> timeline() const;
    std::vector<float> logits() const;
    llama_pos n_past() const;
    int32_t n_cells() const;
    // The capacity edits are checked against: the n_ctx asked for (llama.cpp may allocate a few more cells).
    int32_t n_ctx() const { return params_.n_ctx; }
    SessionStats stats() const;
    std::vector<llama_token> tokenize(const std::string & text, bool add_special) const;

    // Generation: begin_generation() starts a reply (sampler chain, stop strings, token limit,
    // log-probabilities); generate_step() draws one token from the current logits and decodes it into
    // the timeline (an end-of-generation token is reported, not decoded); advance() runs up to
    // `max_steps` steps in one call, returning early once some text became final when `until_text`.
    // A failed step is undone and raised at once; steps before it in the same call stay, and their
    // text comes with the next call. A cancel() stops advance() after the steps already done.
    // flush_generation() ends the reply and returns the bytes it still held back.
    void begin_generation(const ReplyParams & params);
    GenerationStep generate_step();
    GenerationStep advance(int32_t max_steps, bool until_text);
    std::string flush_generation();
    std::string detokenize(const std::vector<llama_token> & tokens) const;

    // One generation step for several slots of one pool in ONE batched decode: each draws from its
    // own logits with its own reply (begin_generation() first), and every token drawn is decoded in
    // a single call, one sequence each. All or nothing: if the decode fails, every session is as
    // before the call. A slot whose KV cells are all used ends ("length") without taking part; a
    // slot whose grammar allows no token ends alone ("error").
    static std::vector<GenerationStep> step_together(const std::vector<std::shared_ptr<Session>> & sessions);
    // Steps the slots together until one of their replies ends, a slot listed in `streams` has new
    // text, `interrupt` is set (checked between steps), or `max_steps`: the server's loop, with no
    // return to the caller per token. Returns what each slot did over all the steps. A failed step is
    // undone and raised at once; the steps before it stay and are reported by the next call.
    static std::vector<GenerationStep> step_until(const std::vector<std::shared_ptr<Session>> & sessions,
                                                  int32_t max_steps, const std::vector<bool> & streams,
                                                  const std::atomic<bool> * interrupt);

    // `n` replies to the timeline sampled together, one batched decode per step: reply i with
    // `params` and seed params.seed + i, in a sequence of its own that starts as a copy of the
    // session's (cells shared, nothing decoded again). The session is as before the call; each reply
    // has at most min(max_tokens, free cells / n) tokens. A session with a context of its own only.
    std::vector<Branch> generate_branches(int32_t n, const SamplingParams & params, int32_t max_tokens,
                                          const std::vector<std::string> & stops);

    // The slot this session is in (0 for a session with a context of its own) and how many slots
    // share its context (1 for its own).
    llama_seq_id slot() const { return seq_; }
    int32_t n_slots() const { return shared_->n_seq; }

    // The whole state as bytes (timeline, embeddings, logits, KV cache), and putting it into this
    // session, which must be empty. On failure the session stays empty.
    std::string save_state() const;
    // `allow_drift`: also a state written by another llama.cpp, placement or CPU kernels (the session
    // is then approximate); otherwise such a state is refused, naming what differs.
    void load_state(const std::string & blob, bool allow_drift = false);

    // Asks the call in flight (if any) to stop; it raises CancelledError and leaves the session
    // unchanged. A single lock-free store: safe from a signal handler.
    void cancel() {
        reply_cancel_.store(true);
        cancel_.cancel.store(true);
    }

    const SessionParams & params() const { return params_; }
    uint64_t id() const { return id_; }
    std::shared_ptr<Model> model() const { return model_; }
    // Per-device KV and compute buffers; the caller holds the model.
    std::vector<MemoryEntry> memory_entries() const;

  private:
    std::vector<llama_token> tokenize_locked(const std::string & text) const;
    // What an edit inserts: text tokenized, media encoded (or taken from the embedding cache).
    std::vector<ChunkSpec> specs_locked(const std::vector<ChunkInput> & inputs);
    // Frees the sampler and timeline; a slot removes its cells from the shared context, which is
    // freed with the last slot or when `drop_context` (the model is closing).
    void free_native(bool drop_context);
    void open_context();
    llama_context * ctx() const { return shared_->ctx.get(); }
    // Error unless the timeline ends in logits to sample from (text last).
    void check_has_logits_locked() const;
    // Error unless a reply is going on and has logits to draw from.
    void check_reply_locked();
    // One step of a session with a context of its own (the registry decodes the token): the token
    // accepted, or -1 where the reply ended undrawn. A failure leaves the session and reply as before.
    llama_token lone_step_locked();
    // What the reply made final since the last call, into `step`.
    void report_locked(GenerationStep & step);
    // One batched step of pool slots (locks held by the caller); the token each decoded goes in `acc`.
    static void step_slots_locked(const std::vector<std::shared_ptr<Session>> & sessions, SharedContext & shared,
                                  llama_batch_ext * batch, std::vector<GenerationStep> & acc);
    void check_open() const;
    // Runs one state-changing call: holds the model, locks the session, checks it is open, clears
    // an earlier cancel, and puts the counters back if `edit` throws (the registry restores the rest).
    template <typename Edit>
    auto run_edit(Edit && edit, bool restore_stats = true) -> decltype(edit());

    LiveObject live_{LiveKind::Session};
    std::shared_ptr<Model> model_;
    SessionParams params_;
    uint64_t id_;
    std::atomic<bool> closed_{false};
    CancelState cancel_;
    std::shared_ptr<SharedContext> shared_;
    llama_seq_id seq_ = 0;
    std::unique_ptr<Reply> reply_;
    std::atomic<bool> reply_cancel_{false};  // cancel() since begin_generation(): advance() stops between steps
    SessionStats stats_;
    std::unique_ptr<ImageEmbedRegistry> registry_;
};

struct StateHeader;  // session_state.h
// Throws Error unless a saved state with this header can be loaded into sessions of `model`.
void check_state_fits(const StateHeader & header, const Model & model);
// `header` with what this build and `model` write states with (llama.cpp commit, KV type,
// placement, CPU kernels).
StateHeader provenance(StateHeader header, const Model & model);

// Defined here: edits (session.cpp) and generation (session_generate.cpp) both run through it.
template <typename Edit>
auto Session::run_edit(Edit && edit, bool restore_stats) -> decltype(edit()) {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(shared_->mutex);
    check_open();
    cancel_.cancel.store(false);
    SharedContext::Call call(*shared_, {&cancel_}, false);
    const SessionStats before = stats_;
    try {
        return edit();
    } catch (...) {
        if (restore_stats) {
            stats_ = before;
        }
        throw;
    }
}

}  // namespace llava_kv
