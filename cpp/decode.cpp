#include "decode.h"

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <mutex>

#include "llama-cpp.h"
#include "mtmd-helper.h"

namespace llava_kv {
namespace {

std::atomic<uint64_t> g_fault_countdown{0};  // 0: disarmed
std::atomic<int> g_fault_kind{static_cast<int>(DecodeFault::None)};

std::mutex g_pause_mutex;
std::condition_variable g_pause_changed;
bool g_paused = false;    // a decode is waiting in pause_decode()
bool g_released = false;  // release_decode_pause() was called for it

}  // namespace

void pause_decode() {
    std::unique_lock<std::mutex> lock(g_pause_mutex);
    g_paused = true;
    g_released = false;
    g_pause_changed.notify_all();
    g_pause_changed.wait(lock, [] { return g_released; });
    g_paused = false;
}

bool wait_decode_paused(double timeout_s) {
    std::unique_lock<std::mutex> lock(g_pause_mutex);
    return g_pause_changed.wait_for(lock, std::chrono::duration<double>(timeout_s), [] { return g_paused; });
}

void release_decode_pause() {
    std::lock_guard<std::mutex> lock(g_pause_mutex);
    g_released = true;
    g_pause_changed.notify_all();
}

void arm_decode_fault(uint64_t nth, DecodeFault kind) {
    g_fault_kind.store(static_cast<int>(kind));
    g_fault_countdown.store(kind == DecodeFault::None ? 0 : nth);
}

DecodeFault take_decode_fault() {
    uint64_t left = g_fault_countdown.load();
    while (left > 0) {
        if (g_fault_countdown.compare_exchange_weak(left, left - 1)) {
            return left == 1 ? static_cast<DecodeFault>(g_fault_kind.load()) : DecodeFault::None;
        }
    }
    return DecodeFault::None;
}

bool all_finite(const float * values, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        if (!std::isfinite(values[i])) {
            return false;
        }
    }
    return true;
}

int32_t decode_text(llama_context * ctx, const llama_token * tokens, size_t n, llama_pos pos, llama_seq_id seq,
                    int32_t n_batch, bool logits_last, DecodeCounts & counts) {
    llama_batch_ext_ptr batch(llama_batch_ext_init(ctx));
    size_t i = 0;
    while (i < n) {
        llama_batch_ext_clear(batch.get());
        int32_t idx = -1;
        int32_t added = 0;
        for (; i < n && added < n_batch; ++i, ++added) {
            idx = llama_batch_ext_add_token(batch.get(), seq, tokens[i]);
            if (idx < 0) {
                return -1;
            }
            llama_pos p = pos++;
            llama_batch_ext_set_pos(batch.get(), idx, &p);
        }
        const bool want_logits = logits_last && i == n;
        if (want_logits) {
            llama_batch_ext_set_output_logits(batch.get(), idx, true);
        }
        const int32_t status = llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch.get());
        if (status != 0) {
            return status;
        }
        counts.calls += 1;
        counts.text_tokens += static_cast<uint64_t>(added);
        counts.logits = want_logits;
    }
    return 0;
}

int32_t decode_embeddings(llama_context * ctx, const float * embd, size_t n_embd, size_t n, llama_pos pos,
                          llama_seq_id seq, int32_t n_batch, DecodeCounts & counts) {
    llama_batch_ext_ptr batch(llama_batch_ext_init(ctx));
    size_t i = 0;
    while (i < n) {
        llama_batch_ext_clear(batch.get());
        int32_t added = 0;
        for (; i < n && added < n_batch; ++i, ++added) {
            const int32_t idx = llama_batch_ext_add_embd(batch.get(), seq, llama_embd{embd + i * n_embd, 1, n_embd});
            if (idx < 0) {
                return -1;
            }
            llama_pos p = pos++;
            llama_batch_ext_set_pos(batch.get(), idx, &p);
        }
        const int32_t status = llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch.get());
        if (status != 0) {
            return status;
        }
        counts.calls += 1;
        counts.image_tokens += static_cast<uint64_t>(added);
        counts.logits = false;
    }
    return 0;
}

int32_t decode_image(mtmd_context * projector, llama_context * ctx, const MediaEmbedding & image, llama_pos & pos,
                     llama_seq_id seq, int32_t n_batch, bool logits_last, DecodeCounts & counts) {
    for (size_t j = 0; j < image.chunks.size(); ++j) {
        const mtmd_input_chunk * sub = image.chunks[j].get();
        if (mtmd_input_chunk_get_type(sub) == MTMD_INPUT_CHUNK_TYPE_TEXT) {
            size_t n = 0;
            const llama_token * tokens = mtmd_input_chunk_get_tokens_text(sub, &n);
            const bool last = logits_last && j + 1 == image.chunks.size();
            const int32_t status = decode_text(ctx, tokens, n, pos, seq, n_batch, last, counts);
            if (status != 0) {
                return status;
            }
            pos += static_cast<llama_pos>(n);
            continue;
        }
        llama_pos new_pos = pos;
        // mtmd reads the embedding but takes a non-const pointer.
        float * embd = const_cast<float *>(image.embeddings[j].data());
        const int32_t status =
            mtmd_helper_decode_image_chunk(projector, ctx, sub, embd, pos, seq, n_batch, &new_pos, nullptr, nullptr);
        if (status != 0) {
            return status;
        }
        const size_t n = mtmd_input_chunk_get_n_tokens(sub);
        counts.calls += (n + static_cast<size_t>(n_batch) - 1) / static_cast<size_t>(n_batch);
        counts.image_tokens += n;
        counts.logits = false;
        pos = new_pos;
    }
    return 0;
}

std::string image_batch_problem(mtmd_context * projector, const MediaEmbedding & image, int32_t max_batch) {
    for (const auto & sub : image.chunks) {
        const size_t n = mtmd_input_chunk_get_n_tokens(sub.get());
        if (mtmd_input_chunk_get_type(sub.get()) != MTMD_INPUT_CHUNK_TYPE_TEXT &&
            mtmd_decode_use_non_causal(projector, sub.get()) && n > static_cast<size_t>(max_batch)) {
            return "this projector attends over a whole image at once, which needs its " + std::to_string(n) +
                   " tokens in one batch; use n_batch >= " + std::to_string(n);
        }
    }
    return {};
}

}  // namespace llava_kv
