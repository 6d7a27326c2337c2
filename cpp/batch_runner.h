// Many (image, prompt) jobs over one model, decoded as parallel sequences of one context.
//
// One worker thread of its own does all the compute: between decode steps it encodes the images the
// free sequences will take next (cache first, then the projector, several per call where it can
// batch), so encoding never competes with decoding for the cores. The prompt text before the image
// is decoded once into a sequence of its own and copied into each job's sequence
// (llama_memory_seq_cp); every decode step carries one token of every generating sequence plus the
// prompt tokens of sequences that just received their image. Results come back as jobs complete.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "image_encoder.h"
#include "llama-cpp.h"
#include "model.h"
#include "reply.h"
#include "sampling.h"
#include "slot_step.h"

namespace llava_kv {

struct BatchParams {
    int32_t n_parallel = 4;
    int32_t n_ctx = 0;  // KV cells one image's sequence may use, shared prefix included; 0: sized from the first image
    int32_t n_batch = 512;
    int32_t n_threads = 0;  // 0: the model's
    int32_t max_tokens = 64;
    SamplingParams sampling;  // each job's seed is sampling.seed + its id, whatever sequence runs it
    std::vector<std::string> stop;
    std::string prefix;  // prompt text before the image (the runner adds BOS where the model wants it)
    std::string suffix;  // prompt text after the image
    int32_t queue_size = 0;    // submitted jobs waiting for the worker; 0: 2 * n_parallel
    int32_t encode_ahead = 0;  // most images encoded in one call; 0: n_parallel
    // The worker takes no job before finish(): every job is queued first, so which sequences share a
    // step does not depend on how fast the caller submits (the queue must hold them all: submit()
    // throws std::length_error instead of blocking when it is full).
    bool start_after_finish = false;
};

// One image to run the prompt on. The pixels are copied in, so the caller's buffer is free at once.
struct BatchJob {
    uint64_t id = 0;
    std::vector<uint8_t> pixels;  // HxWx3 RGB
    uint32_t width = 0;
    uint32_t height = 0;
    std::string digest;
    std::string source;
    std::string error;  // set when the caller could not load the image: passed through as a failed result
    double load_ms = 0;
    std::chrono::steady_clock::time_point submitted;  // set by submit()
};

struct BatchResult {
    uint64_t id = 0;
    std::string source;
    std::string text;  // raw bytes as generated (may end inside a UTF-8 character at max_tokens)
    int32_t n_tokens = 0;
    int32_t n_prompt_tokens = 0;  // tokens this job decoded itself (image + prompt text), not the shared prefix
    std::string finish_reason;    // "stop" (end of generation or a stop string), "length"; empty on error
    std::string error;            // non-empty: this job failed, the others go on
    bool cached = false;          // the embedding came from the cache
    double load_ms = 0;
    double encode_ms = 0;
    double wait_ms = 0;     // encoded, waiting for a free sequence
    double prefill_ms = 0;  // image and prompt decoded, first token sampled
    double generate_ms = 0;
    double total_ms = 0;  // load + from submit() to the result
};

struct BatchStats {
    EncodeCounters encode;
    uint64_t jobs_submitted = 0;
    uint64_t jobs_done = 0;
    uint64_t jobs_failed = 0;
    uint64_t prefix_tokens = 0;  // decoded once, shared by every sequence
    uint64_t prefix_copies = 0;  // sequences that started from the shared prefix
    uint64_t tokens_decoded = 0;
    uint64_t tokens_generated = 0;
    uint64_t decode_steps = 0;    // batched decode calls carrying prompt or generated tokens
    uint64_t max_sequences = 0;   // most sequences carried by one decode step
    int32_t n_ctx = 0;            // KV cells of the whole context, once created
    bool context_reused = false;  // this run found the context and the shared prefix's KV from an earlier run
};

class BatchRunner {
  public:
    // Tokenizes the prompt and starts the worker; the context is created with the first image.
    static std::shared_ptr<BatchRunner> start(std::shared_ptr<Model> model, const BatchParams & params);
    ~BatchRunner();
    BatchRunner(const BatchRunner &) = delete;
    BatchRunner & operator=(const BatchRunner &) = delete;

    // Queues a job; blocks while the queue is full. Throws ClosedError once closed, and
    // std::logic_error after finish().
    void submit(BatchJob job);
    // No more jobs will come.
    void finish();
    // The next finished job, as they complete; blocks. False once every submitted job's result has
    // been returned after finish(). Throws ClosedError if closed before that.
    bool next(BatchResult & out);
    // Stops the worker and frees the context; idempotent. Results not yet taken are dropped.
    void close();
    // Runs again on the same context, the shared prefix's KV cells kept: once the last run's results
    // were all taken (or it was cancelled), the runner takes jobs again, its counters start over and
    // every job's seed is as in a fresh runner. Throws std::logic_error while a run is going on,
    // ClosedError once closed, Error if the worker failed.
    void restart();
    // Ends the current run early: no more jobs are taken (submit() throws CancelledError), queued
    // ones are dropped, running ones stop at once, and their sequences are cleared for the next run.
    void cancel_run();
    bool closed() const { return closed_.load(); }
    BatchStats stats() const;
    // Its context's KV cache and compute buffers per device (none before the first image or once closed).
    std::vector<MemoryEntry> memory_entries() const;
    const BatchParams & params() const { return params_; }

    // For Model::close(): ask the worker to stop before it waits for the model (then close()).
    void request_stop();

  private:
    struct Ready;
    struct Slot;

    BatchRunner(std::shared_ptr<Model> model, const BatchParams & params);
    void worker_loop();
    void run_jobs();
    std::vector<std::unique_ptr<Ready>> encode(std::vector<BatchJob> jobs);
    // A shared hold on the model, or none once a stop is asked for or the model is closed.
    std::shared_lock<std::shared_mutex> acquire_hold() const;

    void create_context(const Ready & first);
    int64_t cells_needed(const Ready & job) const;
    // Why this job can never fit a sequence (empty if it can).
    std::string too_large(const Ready & job) const;
    bool admit(Slot & slot, Ready && job);
    // A job's reply: the runner's settings, seeded with the job's id.
    ReplyParams reply_params(uint64_t job_id) const;
    void decode_step(std::vector<Slot> & slots);
    void finish_slot(Slot & slot, const char * reason);
    void fail_slot(Slot & slot, const std::string & error);
    void emit(BatchResult && result, bool failed);
    // A cancelled run's end: queued and encoded jobs dropped, running ones failed and their sequences cleared.
    void drop_run(std::vector<Slot> & slots);

    static bool abort_requested(void * self);
    bool stopping() const { return stop_.load() || cancel_run_.load(); }

    LiveObject live_{LiveKind::BatchRunner};
    const uint64_t id_;  // names its memory entries
    std::shared_ptr<Model> model_;
    BatchParams params_;
    std::vector<llama_token> prefix_;  // BOS included where the model adds it
    std::vector<llama_token> suffix_;

    std::atomic<bool> stop_{false};
    std::atomic<bool> cancel_run_{false};
    std::atomic<bool> closed_{false};
    std::mutex close_mutex_;

    mutable std::mutex mutex_;  // everything below up to the worker's own state
    std::condition_variable changed_;  // input_ or results_ changed, finish(), or stop
    std::deque<BatchJob> input_;
    std::deque<BatchResult> results_;
    bool input_done_ = false;
    uint64_t returned_ = 0;
    BatchStats stats_;
    std::vector<MemoryEntry> memory_;  // what ctx_ holds, taken when it is created
    std::string failure_;  // why the worker stopped, if it failed

    // Owned by the worker thread (and close(), after joining it).
    std::deque<std::unique_ptr<Ready>> ready_;  // encoded, waiting for a free sequence
    ContextPtr ctx_;
    llama_batch_ext_ptr batch_;
    int64_t seq_cells_ = 0;  // cells one job may use beyond the shared prefix

    std::thread worker_;
};

}  // namespace llava_kv
