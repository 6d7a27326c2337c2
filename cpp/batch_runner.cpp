#include "batch_runner.h"

#include <algorithm>
#include <chrono>
#include <new>
#include <set>

#include "device_ledger.h"
#include "decode.h"
#include "errors.h"
#include "runtime.h"
#include "stop_strings.h"
#include "tokens.h"

namespace llava_kv {


namespace {

using Clock = std::chrono::steady_clock;

double ms_between(Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
}

uint64_t next_runner_id() {
    static std::atomic<uint64_t> last{0};
    return ++last;
}

}  // namespace

// An image ready for a sequence: its embedding (or why there is none) and the times so far.
struct BatchRunner::Ready {
    uint64_t id = 0;
    std::string source;
    std::string error;
    std::shared_ptr<const MediaEmbedding> image;
    bool cached = false;
    double load_ms = 0;
    double encode_ms = 0;
    Clock::time_point submitted;
    Clock::time_point encoded;
};

// One sequence of the context and the job it is running.
struct BatchRunner::Slot {
    std::unique_ptr<Ready> job;  // null: free
    std::unique_ptr<Reply> reply;
    StepSlot step;  // its part of each decode step: the suffix still to decode, then a token at a time
    int32_t n_prompt = 0;
    Clock::time_point admitted;
    Clock::time_point first_token;
};

std::shared_ptr<BatchRunner> BatchRunner::start(std::shared_ptr<Model> model, const BatchParams & params) {
    std::shared_ptr<BatchRunner> runner(new BatchRunner(std::move(model), params));
    runner->model_->track_runner(runner);  // from here on the model's close() stops it
    std::lock_guard<std::mutex> guard(runner->close_mutex_);
    if (!runner->stop_.load()) {
        runner->worker_ = std::thread([r = runner.get()] { r->worker_loop(); });
    }
    return runner;
}

BatchRunner::BatchRunner(std::shared_ptr<Model> model, const BatchParams & params)
    : id_(next_runner_id()), model_(std::move(model)), params_(params) {
    if (params_.n_parallel < 1 || params_.n_parallel > 255) {
        throw std::invalid_argument("parallel must be in [1, 255], got " + std::to_string(params_.n_parallel));
    }
    if (params_.max_tokens < 1) {
        throw std::invalid_argument("max_tokens must be >= 1, got " + std::to_string(params_.max_tokens));
    }
    if (params_.n_batch < 1) {
        throw std::invalid_argument("n_batch must be >= 1, got " + std::to_string(params_.n_batch));
    }
    if (params_.n_batch < params_.n_parallel) {
        throw std::invalid_argument("n_batch (" + std::to_string(params_.n_batch) +
                                    ") must be >= parallel (" + std::to_string(params_.n_parallel) + ")");
    }
    if (params_.n_ctx < 0) {
        throw std::invalid_argument("n_ctx must be >= 0 (0: sized from the first image)");
    }
    if (params_.queue_size <= 0) {
        params_.queue_size = 2 * params_.n_parallel;
    }
    if (params_.encode_ahead <= 0) {
        params_.encode_ahead = params_.n_parallel;
    }
    auto hold = model_->hold();
    Reply validated(*model_, reply_params(0));  // the settings, grammar and stop strings, before any thread starts
    if (model_->projector() == nullptr || !model_->has_vision()) {
        throw ImageError("this model has no vision projector: load it with mmproj_path to run image batches");
    }
    const llama_vocab * vocab = model_->vocab();
    if (llama_vocab_get_add_bos(vocab)) {
        prefix_.push_back(llama_vocab_bos(vocab));
    }
    const std::vector<llama_token> prefix = tokenize_text(vocab, params_.prefix);
    prefix_.insert(prefix_.end(), prefix.begin(), prefix.end());
    suffix_ = tokenize_text(vocab, params_.suffix);
    if (suffix_.empty()) {
        // Generation samples from the logits after the last prompt token, which must be text.
        throw std::invalid_argument("the prompt must have text after the image");
    }
    if (params_.n_ctx > 0 && params_.n_ctx <= static_cast<int32_t>(prefix_.size())) {
        throw std::invalid_argument("n_ctx=" + std::to_string(params_.n_ctx) + " leaves no room after the " +
                                    std::to_string(prefix_.size()) + " tokens of the prompt before the image");
    }
    if (int64_t(params_.n_parallel + 1) * params_.n_ctx > INT32_MAX) {
        throw std::invalid_argument("parallel=" + std::to_string(params_.n_parallel) + " sequences of n_ctx=" +
                                    std::to_string(params_.n_ctx) + " cells are more than llama.cpp can address");
    }
}

BatchRunner::~BatchRunner() { close(); }

bool BatchRunner::abort_requested(void * self) {
    return static_cast<const BatchRunner *>(self)->stopping();
}

std::shared_lock<std::shared_mutex> BatchRunner::acquire_hold() const {
    // Never block on the model: Model::close() holds it exclusively while it joins the worker.
    while (!stop_.load()) {
        auto hold = model_->try_hold();
        if (hold.owns_lock() || model_->closed()) {
            return hold;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return {};
}

void BatchRunner::submit(BatchJob job) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (cancel_run_.load()) {
        throw CancelledError("the batch run was cancelled");
    }
    if (input_done_) {
        throw std::logic_error("submit() after finish()");
    }
    if (params_.start_after_finish && input_.size() >= static_cast<size_t>(params_.queue_size)) {
        throw std::length_error("the queue of " + std::to_string(params_.queue_size) +
                                " jobs is full and the worker starts only after finish(): raise queue_size");
    }
    changed_.wait(lock, [&] {
        return stop_.load() || cancel_run_.load() || input_.size() < static_cast<size_t>(params_.queue_size);
    });
    if (stop_.load()) {
        throw ClosedError("the batch runner is closed");
    }
    if (cancel_run_.load()) {
        throw CancelledError("the batch run was cancelled");
    }
    stats_.jobs_submitted += 1;
    job.submitted = Clock::now();
    input_.push_back(std::move(job));
    changed_.notify_all();
}

void BatchRunner::finish() {
    std::lock_guard<std::mutex> lock(mutex_);
    input_done_ = true;
    changed_.notify_all();
}

bool BatchRunner::next(BatchResult & out) {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] {
        return stop_.load() || !results_.empty() || (input_done_ && returned_ == stats_.jobs_submitted);
    });
    if (!results_.empty()) {
        out = std::move(results_.front());
        results_.pop_front();
        returned_ += 1;
        return true;
    }
    if (input_done_ && returned_ == stats_.jobs_submitted) {
        return false;
    }
    if (!failure_.empty()) {
        throw Error("the batch runner failed and stopped: " + failure_);
    }
    throw ClosedError(model_->closed() ? "the model was closed while the batch was running"
                                       : "the batch runner was closed before all results came back");
}

BatchStats BatchRunner::stats() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
}

std::vector<MemoryEntry> BatchRunner::memory_entries() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return memory_;
}

void BatchRunner::request_stop() {
    stop_.store(true);
    std::lock_guard<std::mutex> lock(mutex_);
    changed_.notify_all();
}

void BatchRunner::close() {
    std::lock_guard<std::mutex> guard(close_mutex_);
    if (closed_.load()) {
        return;
    }
    request_stop();
    if (worker_.joinable()) {
        worker_.join();
    }
    batch_.reset();
    ctx_.reset();
    {
        std::lock_guard<std::mutex> lock(mutex_);
        memory_.clear();
    }
    closed_.store(true);
}

void BatchRunner::cancel_run() {
    std::lock_guard<std::mutex> lock(mutex_);
    cancel_run_.store(true);
    input_done_ = true;
    changed_.notify_all();
}

void BatchRunner::restart() {
    std::lock_guard<std::mutex> guard(close_mutex_);  // not while close() joins the worker
    auto refuse_if_dead = [&] {
        if (!failure_.empty()) {
            throw Error("the batch runner failed and stopped: " + failure_);
        }
        if (closed_.load() || stop_.load()) {
            throw ClosedError(model_->closed() ? "the model was closed" : "the batch runner is closed");
        }
    };
    {
        std::lock_guard<std::mutex> lock(mutex_);
        refuse_if_dead();
        if (!cancel_run_.load() && !(input_done_ && returned_ == stats_.jobs_submitted)) {
            throw std::logic_error("a batch run is still going on: take all its results (or cancel it) first");
        }
    }
    if (worker_.joinable()) {
        worker_.join();  // it returns once the run's input is done and its sequences are free
    }
    std::lock_guard<std::mutex> lock(mutex_);
    refuse_if_dead();
    input_.clear();
    results_.clear();
    input_done_ = false;
    returned_ = 0;
    BatchStats fresh;
    fresh.n_ctx = stats_.n_ctx;
    fresh.prefix_tokens = stats_.prefix_tokens;
    fresh.context_reused = static_cast<bool>(ctx_);
    stats_ = fresh;
    cancel_run_.store(false);
    worker_ = std::thread([this] { worker_loop(); });
}

void BatchRunner::drop_run(std::vector<Slot> & slots) {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        input_.clear();
    }
    ready_.clear();
    for (auto & slot : slots) {
        if (slot.job) {
            fail_slot(slot, "cancelled");  // frees its sequence for the next run
        }
    }
}

void BatchRunner::emit(BatchResult && result, bool failed) {
    std::lock_guard<std::mutex> lock(mutex_);
    (failed ? stats_.jobs_failed : stats_.jobs_done) += 1;
    results_.push_back(std::move(result));
    changed_.notify_all();
}

std::vector<std::unique_ptr<BatchRunner::Ready>> BatchRunner::encode(std::vector<BatchJob> jobs) {
    std::vector<std::unique_ptr<Ready>> done;
    std::vector<const MediaInput *> pending;
    std::vector<MediaInput> pixels(jobs.size());
    std::vector<size_t> pending_jobs;
    for (size_t i = 0; i < jobs.size(); ++i) {
        auto r = std::make_unique<Ready>();
        r->id = jobs[i].id;
        r->source = jobs[i].source;
        r->error = jobs[i].error;
        r->load_ms = jobs[i].load_ms;
        r->submitted = jobs[i].submitted;
        if (r->error.empty() && jobs[i].pixels.size() != size_t(jobs[i].width) * jobs[i].height * 3) {
            r->error = "image buffer of " + std::to_string(jobs[i].pixels.size()) + " bytes does not hold " +
                       std::to_string(jobs[i].width) + "x" + std::to_string(jobs[i].height) + " RGB pixels";
        }
        if (r->error.empty()) {
            pixels[i] = {jobs[i].pixels.data(), jobs[i].width, jobs[i].height, jobs[i].digest, jobs[i].source};
            pending.push_back(&pixels[i]);
            pending_jobs.push_back(i);
        }
        done.push_back(std::move(r));
    }
    if (pending.empty()) {
        return done;
    }
    std::set<std::string> seen;  // a picture twice in one call is encoded once
    for (size_t k = 0; k < pending.size(); ++k) {
        done[pending_jobs[k]]->cached = !seen.insert(pending[k]->digest).second ||
                                        static_cast<bool>(model_->embedding_cache().peek(pending[k]->digest));
    }
    EncodeCounters counters;
    const auto t0 = Clock::now();
    std::vector<std::shared_ptr<const MediaEmbedding>> embeddings;
    try {
        embeddings = embed_media(*model_, pending, counters, &ctx_);
    } catch (const std::exception &) {
        // One bad image fails only itself: encode one at a time to find it.
        embeddings.assign(pending.size(), nullptr);
        for (size_t k = 0; k < pending.size(); ++k) {
            try {
                embeddings[k] = embed_media(*model_, {pending[k]}, counters, &ctx_).front();
            } catch (const std::exception & e) {
                done[pending_jobs[k]]->error = e.what();
            }
        }
    }
    const auto t1 = Clock::now();
    size_t n_encoded = 0;
    for (size_t k = 0; k < pending.size(); ++k) {
        n_encoded += done[pending_jobs[k]]->cached ? 0 : 1;
    }
    for (size_t k = 0; k < pending.size(); ++k) {
        Ready & r = *done[pending_jobs[k]];
        r.image = embeddings[k];
        r.encode_ms = r.cached || n_encoded == 0 ? 0.0 : ms_between(t0, t1) / double(n_encoded);
    }
    for (auto & r : done) {
        r->encoded = t1;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.encode.images_encoded += counters.images_encoded;
    stats_.encode.embed_cache_hits += counters.embed_cache_hits;
    stats_.encode.embed_cache_misses += counters.embed_cache_misses;
    stats_.encode.batched_encodes += counters.batched_encodes;
    return done;
}

int64_t BatchRunner::cells_needed(const Ready & job) const {
    return int64_t(job.image->n_tokens) + int64_t(suffix_.size()) + int64_t(params_.max_tokens);
}

std::string BatchRunner::too_large(const Ready & job) const {
    if (cells_needed(job) <= seq_cells_) {
        return {};
    }
    return "the image needs " + std::to_string(cells_needed(job)) + " KV cells (image " +
           std::to_string(job.image->n_tokens) + ", prompt " + std::to_string(suffix_.size()) + ", max_tokens " +
           std::to_string(params_.max_tokens) + ") after the shared prompt of " + std::to_string(prefix_.size()) +
           ", more than n_ctx=" + std::to_string(int64_t(prefix_.size()) + seq_cells_) +
           " per image allows; lower max_tokens or pass a larger n_ctx";
}

void BatchRunner::create_context(const Ready & first) {
    // Room for every sequence at once; sized from the first image (plus a quarter for larger ones,
    // at most the model's training context) unless n_ctx says how much one image may use.
    const int64_t prefix = static_cast<int64_t>(prefix_.size());
    if (params_.n_ctx > 0) {
        seq_cells_ = params_.n_ctx - prefix;
    } else {
        const int64_t wanted = cells_needed(first) + cells_needed(first) / 4;
        seq_cells_ = std::min(wanted, std::max<int64_t>(model_->n_ctx_train() - prefix, 1));
    }
    // One KV stream per sequence (and one for the prefix): attention in a step reads only each
    // sequence's own cells, where a unified cache would make every token read every image's.
    const int64_t n_ctx = int64_t(params_.n_parallel + 1) * (prefix + seq_cells_);
    if (n_ctx > INT32_MAX) {
        throw Error("a batch context of " + std::to_string(n_ctx) + " cells (" + std::to_string(params_.n_parallel) +
                    " sequences) is more than llama.cpp can address; lower parallel or n_ctx");
    }
    model_->check_context_memory(n_ctx);
    LedgerOwner owner("session");
    llama_context_params cparams = model_->context_params(params_.n_threads);
    cparams.n_ctx = static_cast<uint32_t>(n_ctx);
    cparams.n_batch = static_cast<uint32_t>(params_.n_batch);
    cparams.n_ubatch = static_cast<uint32_t>(params_.n_batch);
    cparams.n_seq_max = static_cast<uint32_t>(params_.n_parallel + 1);  // + the shared prefix
    // llama.cpp keeps room for one output per sequence even when n_batch is smaller.
    cparams.n_outputs_max = static_cast<uint32_t>(std::max(params_.n_batch, params_.n_parallel + 1));
    cparams.kv_unified = false;  // the prefix is copied into a sequence's stream when it starts
    cparams.abort_callback = &BatchRunner::abort_requested;
    cparams.abort_callback_data = this;
    take_logged_errors();
    ctx_ = model_->new_context(cparams);
    if (!ctx_) {
        const std::string why = take_logged_errors();
        throw Error("could not create a batch context of " + std::to_string(n_ctx) + " cells for " +
                    std::to_string(params_.n_parallel) + " sequences (out of memory? lower parallel or n_ctx)" +
                    (why.empty() ? "" : "\nllama.cpp said:\n" + why));
    }
    batch_.reset(llama_batch_ext_init(ctx_.get()));
    const llama_seq_id prefix_seq = params_.n_parallel;
    DecodeCounts counts;
    const int32_t status =
        decode_text(ctx_.get(), prefix_.data(), prefix_.size(), 0, prefix_seq, params_.n_batch, false, counts);
    if (status != 0) {
        throw Error("decoding the shared prompt prefix failed (status " + std::to_string(status) + ")");
    }
    MemoryEntry tag;
    tag.batch_id = id_;
    std::vector<MemoryEntry> memory = context_memory(ctx_.get(), tag);
    std::lock_guard<std::mutex> lock(mutex_);
    memory_ = std::move(memory);
    stats_.n_ctx = static_cast<int32_t>(llama_n_ctx(ctx_.get()));
    stats_.prefix_tokens = prefix_.size();
    stats_.tokens_decoded += prefix_.size();
}

bool BatchRunner::admit(Slot & slot, Ready && job) {
    // Start from the shared prefix, then decode the image into this sequence.
    llama_memory_t mem = llama_get_memory(ctx_.get());
    llama_memory_seq_rm(mem, slot.step.seq, -1, -1);
    llama_memory_seq_cp(mem, params_.n_parallel, slot.step.seq, -1, -1);
    slot.job = std::make_unique<Ready>(std::move(job));
    slot.admitted = Clock::now();
    slot.n_prompt = 0;
    slot.reply = std::make_unique<Reply>(*model_, reply_params(slot.job->id));
    const llama_seq_id seq = slot.step.seq;
    slot.step = StepSlot{};
    slot.step.seq = seq;
    slot.step.reply = slot.reply.get();
    slot.step.pos = static_cast<llama_pos>(prefix_.size());
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stats_.prefix_copies += 1;
    }
    const MediaEmbedding & image = *slot.job->image;
    const std::string problem = image_batch_problem(model_->projector(), image, params_.n_batch);
    if (!problem.empty()) {
        fail_slot(slot, problem);
        return false;
    }
    DecodeCounts counts;
    const int32_t status = decode_image(model_->projector(), ctx_.get(), image, slot.step.pos, slot.step.seq,
                                        params_.n_batch, false, counts);
    if (status != 0) {
        fail_slot(slot, stopping() ? "stopped" : "decoding the image failed (status " + std::to_string(status) + ")");
        return false;
    }
    slot.n_prompt = static_cast<int32_t>(counts.text_tokens + counts.image_tokens);
    slot.step.prompt = suffix_.data();
    slot.step.n_prompt = suffix_.size();
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.tokens_decoded += counts.text_tokens + counts.image_tokens;
    return true;
}

void BatchRunner::finish_slot(Slot & slot, const char * reason) {
    const auto now = Clock::now();
    BatchResult r;
    r.id = slot.job->id;
    r.source = slot.job->source;
    r.text = slot.reply->text();
    r.n_tokens = slot.reply->n_tokens();
    r.n_prompt_tokens = slot.n_prompt;
    r.finish_reason = reason;
    r.cached = slot.job->cached;
    r.load_ms = slot.job->load_ms;
    r.encode_ms = slot.job->encode_ms;
    r.wait_ms = ms_between(slot.job->encoded, slot.admitted);
    r.prefill_ms = ms_between(slot.admitted, slot.first_token);
    r.generate_ms = ms_between(slot.first_token, now);
    r.total_ms = slot.job->load_ms + ms_between(slot.job->submitted, now);
    llama_memory_seq_rm(llama_get_memory(ctx_.get()), slot.step.seq, -1, -1);
    slot.job.reset();
    slot.reply.reset();
    slot.step.reply = nullptr;
    emit(std::move(r), false);
}

void BatchRunner::fail_slot(Slot & slot, const std::string & error) {
    BatchResult r;
    r.id = slot.job->id;
    r.source = slot.job->source;
    r.error = error;
    r.cached = slot.job->cached;
    r.load_ms = slot.job->load_ms;
    r.encode_ms = slot.job->encode_ms;
    r.total_ms = slot.job->load_ms + ms_between(slot.job->submitted, Clock::now());
    if (ctx_) {
        llama_memory_seq_rm(llama_get_memory(ctx_.get()), slot.step.seq, -1, -1);
    }
    slot.job.reset();
    slot.reply.reset();
    slot.step.reply = nullptr;
    emit(std::move(r), true);
}

ReplyParams BatchRunner::reply_params(uint64_t job_id) const {
    ReplyParams p;
    p.sampling = params_.sampling;
    p.sampling.seed += static_cast<uint32_t>(job_id);  // whatever sequence runs the job
    p.max_tokens = params_.max_tokens;
    p.stops = params_.stop;
    return p;
}

void BatchRunner::decode_step(std::vector<Slot> & slots) {
    // Every generating sequence's drawn token, then prompt text of new ones as room allows, in one call.
    std::vector<StepSlot *> live;
    for (auto & slot : slots) {
        if (slot.job) {
            live.push_back(&slot.step);
        }
    }
    const StepDecode d = decode_slots(ctx_.get(), batch_.get(), live, params_.n_batch, [&](llama_batch_ext * b) {
        if (take_decode_fault() == DecodeFault::Exception) {
            throw std::bad_alloc();  // test hook: a failure inside the worker
        }
        return llama_process(ctx_.get(), LLAMA_PROCESS_TYPE_DECODE, b);
    });
    if (d.status != 0) {
        const std::string why = stopping() ? std::string("stopped")
                                             : "decoding failed (status " + std::to_string(d.status) + ")";
        for (auto & slot : slots) {
            if (slot.job && (slot.step.out >= 0 || slot.step.prompt_taken > 0)) {
                fail_slot(slot, why);
            }
        }
        return;
    }
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stats_.decode_steps += 1;
        stats_.tokens_decoded += static_cast<uint64_t>(d.n_tokens);
        stats_.max_sequences = std::max<uint64_t>(stats_.max_sequences, static_cast<uint64_t>(d.n_slots));
    }
    const auto now = Clock::now();
    for (auto & slot : slots) {
        if (!slot.job) {
            continue;
        }
        slot.n_prompt += static_cast<int32_t>(slot.step.prompt_taken);
        if (slot.step.out >= 0 && slot.step.prompt_taken > 0) {
            slot.first_token = now;  // the prompt's last token: the first logits to draw from
        }
        if (slot.step.bad_logits) {
            fail_slot(slot, kNonFiniteLogits);
        }
    }
    // Draw each sequence's next token now, so a job that ends frees its sequence before the next step.
    live.clear();
    int64_t generated = 0;
    for (auto & slot : slots) {
        if (slot.job) {
            live.push_back(&slot.step);
            generated -= slot.reply->n_tokens();
        }
    }
    draw_slots(*model_, live);
    for (auto & slot : slots) {
        generated += slot.job ? slot.reply->n_tokens() : 0;
    }
    {
        // Counted before any result of this step goes out: a caller that has every result reads final counters.
        std::lock_guard<std::mutex> lock(mutex_);
        stats_.tokens_generated += static_cast<uint64_t>(generated);
    }
    for (auto & slot : slots) {
        if (!slot.job) {
            continue;
        }
        if (slot.reply->done()) {
            if (slot.reply->finish_reason() == "error") {
                fail_slot(slot, slot.reply->error());  // this job alone: the others go on
            } else {
                finish_slot(slot, slot.reply->finish_reason().c_str());
            }
        }
    }
}

void BatchRunner::worker_loop() {
    // Nothing may escape a thread's function (std::terminate): a failure ends the run and reaches
    // the consumer's next() as an exception.
    try {
        run_jobs();
    } catch (const std::exception & e) {
        std::lock_guard<std::mutex> lock(mutex_);
        failure_ = e.what();
        stop_.store(true);
        changed_.notify_all();
    } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        failure_ = "an unknown C++ exception";
        stop_.store(true);
        changed_.notify_all();
    }
}

void BatchRunner::run_jobs() {
    std::vector<Slot> slots(static_cast<size_t>(params_.n_parallel));
    for (size_t i = 0; i < slots.size(); ++i) {
        slots[i].step.seq = static_cast<llama_seq_id>(i);
    }
    std::string broken;  // why the context cannot run; every job fails with it
    if (params_.start_after_finish) {
        std::unique_lock<std::mutex> lock(mutex_);
        changed_.wait(lock, [&] { return stop_.load() || input_done_; });
    }
    while (!stop_.load()) {
        if (cancel_run_.load()) {
            drop_run(slots);
            return;
        }
        size_t free = 0;
        for (const auto & slot : slots) {
            free += slot.job ? 0 : 1;
        }
        // Encode what the free sequences will take next, between decode steps of the running ones:
        // one thread does all compute, so encoding never competes with decoding for the cores.
        std::vector<BatchJob> jobs;
        {
            std::unique_lock<std::mutex> lock(mutex_);
            if (free == slots.size() && ready_.empty()) {
                changed_.wait(lock, [&] { return stop_.load() || !input_.empty() || input_done_; });
                if (stop_.load() || cancel_run_.load() || (input_.empty() && input_done_)) {
                    return;
                }
            }
            const size_t want = std::min<size_t>(params_.encode_ahead, free > ready_.size() ? free - ready_.size() : 0);
            while (!input_.empty() && jobs.size() < want) {
                jobs.push_back(std::move(input_.front()));
                input_.pop_front();
            }
            if (!jobs.empty()) {
                changed_.notify_all();  // room for submit()
            }
        }
        auto hold = acquire_hold();
        if (!hold.owns_lock()) {
            return;
        }
        for (auto & r : encode(std::move(jobs))) {
            ready_.push_back(std::move(r));
        }
        // Take encoded jobs into free sequences while the context has room for them.
        for (auto & slot : slots) {
            while (!slot.job && !ready_.empty() && !stop_.load()) {
                Ready & r = *ready_.front();
                if (r.error.empty() && !broken.empty()) {
                    r.error = broken;
                }
                if (r.error.empty() && !ctx_) {
                    try {
                        create_context(r);  // sized from this first image
                    } catch (const std::exception & e) {
                        ctx_.reset();
                        broken = e.what();
                        continue;
                    }
                }
                if (r.error.empty()) {
                    r.error = too_large(r);
                }
                if (!r.error.empty()) {
                    std::unique_ptr<Ready> job = std::move(ready_.front());
                    ready_.pop_front();
                    BatchResult res;
                    res.id = job->id;
                    res.source = job->source;
                    res.error = job->error;
                    res.load_ms = job->load_ms;
                    res.total_ms = job->load_ms + ms_between(job->submitted, Clock::now());
                    emit(std::move(res), true);
                    continue;
                }
                std::unique_ptr<Ready> job = std::move(ready_.front());
                ready_.pop_front();
                admit(slot, std::move(*job));
            }
        }
        bool any = false;
        for (const auto & slot : slots) {
            any = any || static_cast<bool>(slot.job);
        }
        if (any) {
            decode_step(slots);
        }
    }
}

}  // namespace llava_kv
