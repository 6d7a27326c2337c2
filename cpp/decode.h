// Writing text tokens and encoded images into a context's KV cache, split into batches the same way
// wherever it happens (a session's edit, a fresh run, the batch runner), because the splits decide
// whether two runs give bitwise the same logits.
#pragma once

#include <atomic>
#include <cstdint>
#include <exception>
#include <string>

#include "embedding_cache.h"
#include "llama.h"
#include "mtmd.h"

namespace llava_kv {

// When a context's decoding must stop. The owner's abort callback reads abort_requested(); a
// rollback sets `restoring` while it re-decodes the previous state, so that a cancel() that stopped
// the edit cannot also stop the restore of what was there before it.
struct CancelState {
    std::atomic<bool> cancel{false};     // cancel(): the call in flight stops, nothing changes
    std::atomic<bool> closing{false};    // close(): the call stops and its state is dropped
    std::atomic<bool> restoring{false};  // a rollback is re-decoding the previous state

    bool abort_requested() const {
        return closing.load(std::memory_order_relaxed) ||
               (cancel.load(std::memory_order_relaxed) && !restoring.load(std::memory_order_relaxed));
    }
};

// Test-only fault injection, so every rollback path can be made to run: arm_decode_fault(n, kind)
// makes the n-th decode call from now (1 = the next one) fail in the given way. Disarmed by default.
// Status: a failing status; Exception: a C++ exception; Cancel / Close: the owner's cancel() or
// close() arrives, and the decode is aborted for real; Pause: the decode waits (holding whatever
// the call holds) until release_decode_pause(), so tests can order threads with events, not sleeps.
enum class DecodeFault { None, Status, Exception, Cancel, Close, Pause };
void arm_decode_fault(uint64_t nth, DecodeFault kind);
// Called once per decode call by the code that can take the fault: the armed fault when it is due.
DecodeFault take_decode_fault();
// Pause: blocks the calling decode until released; the test side waits for it to be reached.
void pause_decode();
bool wait_decode_paused(double timeout_s);
void release_decode_pause();

// Statuses of our own beside llama_process's (0 ok, 1 no KV slot, 2 aborted, < 0 errors).
constexpr int32_t kDecodeThrew = -100;      // a C++ exception escaped a decode

// The status `step()` returns, or kDecodeThrew (the exception's text in `what`, when given) if it
// throws: llama.cpp throws from a decode on some failures (an allocation, a backend error), which
// must fail the call and roll it back like any failed status, never escape half done.
template <typename Step>
int32_t decode_status(Step && step, std::string * what = nullptr) {
    try {
        return step();
    } catch (const std::exception & e) {
        if (what != nullptr) {
            *what = e.what();
        }
        return kDecodeThrew;
    }
}
constexpr int32_t kDecodeNonFinite = -101;  // the logits hold NaN or inf
constexpr const char * kNonFiniteLogits =
    "the model produced non-finite logits (NaN or inf): its weights or hyperparameters are broken";

// Whether all `n` values are finite (a model with broken weights or hyperparameters gives NaN).
bool all_finite(const float * values, size_t n);

// What one decode call did, for the callers' counters.
struct DecodeCounts {
    uint64_t calls = 0;  // llama_process calls (batches)
    uint64_t text_tokens = 0;
    uint64_t image_tokens = 0;
    bool logits = false;  // the last batch asked for the logits of its last token
};

// Decodes `n` tokens at positions pos, pos+1, ... into `seq`, n_batch at a time from the first (as
// mtmd_helper_eval_chunk_single splits a text chunk); with `logits_last` the last token's logits are
// requested. Returns llama_process's status (0: all decoded), -1 if a batch could not be filled.
int32_t decode_text(llama_context * ctx, const llama_token * tokens, size_t n, llama_pos pos, llama_seq_id seq,
                    int32_t n_batch, bool logits_last, DecodeCounts & counts);

// Decodes `n` rows of an image chunk's embeddings (`n_embd` floats each) at positions pos, pos+1, ...
// into `seq`, n_batch rows at a time: the first tokens of an image a blend edit recomputes. Single-axis
// positions only (not M-RoPE) and causal attention only (the caller checks both). No logits.
int32_t decode_embeddings(llama_context * ctx, const float * embd, size_t n_embd, size_t n, llama_pos pos,
                          llama_seq_id seq, int32_t n_batch, DecodeCounts & counts);

// Decodes an encoded image (its marker text and image chunks) into `seq` from `pos`, which ends after
// it. With `logits_last`, the logits of a trailing text chunk (an end-of-image marker) are requested.
int32_t decode_image(mtmd_context * projector, llama_context * ctx, const MediaEmbedding & image, llama_pos & pos,
                     llama_seq_id seq, int32_t n_batch, bool logits_last, DecodeCounts & counts);

// Why `image` cannot be decoded in batches of `max_batch` tokens (empty if it can): a projector that
// attends over a whole image at once needs all of an image chunk's tokens in one batch.
std::string image_batch_problem(mtmd_context * projector, const MediaEmbedding & image, int32_t max_batch);

}  // namespace llava_kv
