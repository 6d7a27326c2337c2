// A loaded text model plus its optional projector. Immutable once loaded, shared by sessions.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "embedding_cache.h"
#include "live_objects.h"
#include "llama-cpp.h"
#include "mtmd.h"
#include "runtime.h"

namespace llava_kv {

class BatchRunner;
class Session;
struct SessionParams;

// The device a buffer type's memory lives on ("CPU" for host buffers).
std::string buft_device_name(ggml_backend_buffer_type_t buft);

struct ModelParams {
    int32_t n_gpu_layers = 0;
    bool mmproj_use_gpu = true;
    int32_t n_threads = 0;  // 0: one per core
    bool verbose = false;
    size_t embed_cache_bytes = size_t(1) << 30;
    // Flash attention in every context of the model: llama.cpp's choice (AUTO), or forced on/off.
    // Part of what makes two runtimes' logits comparable (llama-cpp-python's Llama() defaults to off).
    llama_flash_attn_type flash_attn = LLAMA_FLASH_ATTN_TYPE_AUTO;
    // The device that holds the offloaded layers, the projector (with mmproj_use_gpu) and so the
    // sessions' KV and compute buffers of those layers; "" for llama.cpp's choice (every GPU it sees).
    std::string main_gpu;
    // The KV cache's element types (f16, q8_0 or q4_0) of K and of V, in every context of the model.
    ggml_type type_k = GGML_TYPE_F16;
    ggml_type type_v = GGML_TYPE_F16;
};

// "f16" where K and V have one type, else "q8_0/f16" (K, then V): how states and errors name it.
std::string kv_type_name(const ModelParams & params);

// Bytes one component holds on one device.
struct MemoryEntry {
    std::string component;  // "weights", "projector", "embedding_cache", or a session's "kv" / "compute"
    std::string device;
    size_t bytes = 0;
    uint64_t session_id = 0;  // the session a "kv" / "compute" entry belongs to (0: not a session's)
    uint64_t batch_id = 0;    // or the batch runner it belongs to
};

struct MemoryReport {
    std::vector<MemoryEntry> entries;
    std::vector<DeviceInfo> devices;
};

// A context's KV cache ("kv") and compute buffers ("compute") per device: each entry a copy of
// `tag` (which names the session or the batch runner) with its component, device and bytes.
std::vector<MemoryEntry> context_memory(llama_context * ctx, const MemoryEntry & tag);


// Frees a llama_context, then the CPU thread pool it computed on (Model::new_context).
struct ContextDeleter {
    ggml_threadpool_t threads = nullptr;
    void (*free_threads)(ggml_threadpool_t) = nullptr;
    void operator()(llama_context * ctx) const;
};
using ContextPtr = std::unique_ptr<llama_context, ContextDeleter>;
// Sends `ctx`'s CPU workers to sleep now rather than after they have polled a few ms for its next
// graph, because other compute comes first (the projector's, on threads of its own): polling, they
// would take a core from it. Call with no graph in flight on `ctx`; its next graph wakes them.
void rest_threads(const ContextPtr & ctx);
// How many times rest_threads() has sent a pool's workers to sleep in this process (a test hook).
uint64_t threads_rested();

class Model : public std::enable_shared_from_this<Model> {
  public:
    static std::shared_ptr<Model> load(const std::string & model_path, const std::string & mmproj_path,
                                       const ModelParams & params);
    ~Model();
    Model(const Model &) = delete;
    Model & operator=(const Model &) = delete;

    // Stops every batch runner and closes every session made from this model, then frees the
    // projector, then the weights. Waits for calls in flight; idempotent.
    void close();
    bool closed() const { return closed_.load(); }

    // A shared hold on the native state for the length of one call: close() waits for it.
    // Throws ClosedError once the model is closed.
    std::shared_lock<std::shared_mutex> hold() const;
    // The same hold if it can be had at once; an empty lock if not (busy, closing or closed).
    std::shared_lock<std::shared_mutex> try_hold() const;

    std::shared_ptr<Session> open_session(const SessionParams & params);
    // `n_slots` sessions sharing one context, a sequence each (see open_session_pool in session.h).
    std::vector<std::shared_ptr<Session>> open_pool(const SessionParams & params, int32_t n_slots);
    std::vector<std::shared_ptr<Session>> live_sessions() const;
    std::vector<std::shared_ptr<BatchRunner>> live_runners() const;
    // A batch runner to stop and free when the model closes.
    void track_runner(const std::shared_ptr<BatchRunner> & runner);

    llama_model * llama() const { return model_.get(); }
    const llama_vocab * vocab() const { return vocab_; }
    mtmd_context * projector() const { return projector_.get(); }
    // mtmd contexts are not safe for concurrent use: every tokenize/encode takes this lock.
    std::mutex & projector_mutex() const { return projector_mutex_; }
    EmbeddingCache & embedding_cache() { return cache_; }

    const std::string & path() const { return path_; }
    const std::string & mmproj_path() const { return mmproj_path_; }
    const ModelParams & params() const { return params_; }
    int32_t n_embd() const { return n_embd_; }
    int32_t n_vocab() const { return n_vocab_; }
    int32_t n_ctx_train() const { return n_ctx_train_; }
    bool has_vision() const { return has_vision_; }
    bool has_audio() const { return has_audio_; }
    int32_t audio_sample_rate() const { return audio_sample_rate_; }  // -1 without audio
    bool uses_mrope() const { return uses_mrope_; }
    int32_t n_threads() const { return n_threads_; }
    std::string description() const { return description_; }
    // The bytes of every token (token_piece), computed at the first call (constrained generation).
    const std::vector<std::string> & token_pieces() const;
    // The tokens of `text` (special tokens parsed; `add_special`: BOS first where the model adds one),
    // and the bytes of `tokens` (std::invalid_argument naming an id outside the vocabulary). The
    // caller holds the model.
    std::vector<llama_token> tokenize(const std::string & text, bool add_special) const;
    std::vector<std::string> pieces_of(const std::vector<llama_token> & tokens) const;
    // std::invalid_argument naming the first id outside the vocabulary.
    void check_token_ids(const std::vector<llama_token> & tokens) const;

    MemoryReport memory() const;

    // The settings every context of this model shares (threads, flash attention, no perf counters);
    // callers add sizes and their abort callback. n_threads 0: the model's.
    llama_context_params context_params(int32_t n_threads) const;
    // A context of this model with `cparams`, computing on a CPU thread pool of its own (ggml's,
    // cparams.n_threads workers; freed with the context). Null where llama.cpp refuses the context.
    ContextPtr new_context(const llama_context_params & cparams) const;
    // Refuses (ContextFullError naming the device and the sizes) a context of `n_cells` KV cells that
    // the devices holding its cache could not take, before llama.cpp allocates it: one layer's K or V
    // tensor larger than such a device can address (its backend would abort the process at the first
    // decode), or a cache larger than the memory it has free (a lower bound: K and V of every layer;
    // sliding-window models, whose cache is smaller, are checked for the first case only).
    void check_context_memory(int64_t n_cells) const;
    // The devices other than the CPU that hold some of the text model's weights (and so their layers'
    // KV cache and compute).
    std::vector<ggml_backend_dev_t> weight_devices() const;
    // Where the layers (and so their KV cells) run: the devices holding weights, "+CPU" where some
    // layers stay on the CPU; "CPU" for a CPU-only model.
    std::string placement() const;

    // The model's chat template (empty if it has none), and a conversation rendered with it by
    // llama.cpp's template engine. `messages` are (role, content) pairs.
    std::string chat_template() const;
    std::string apply_chat_template(const std::vector<std::pair<std::string, std::string>> & messages,
                                    bool add_assistant, const std::string & template_override) const;

  private:
    Model(std::string path, std::string mmproj_path, const ModelParams & params);

    LiveObject live_{LiveKind::Model};
    std::string path_;
    std::string mmproj_path_;
    ModelParams params_;
    Verbosity verbosity_;

    mutable std::shared_mutex lifetime_;
    std::atomic<bool> closed_{false};

    llama_model_ptr model_;
    mtmd::context_ptr projector_;
    mutable std::mutex projector_mutex_;
    const llama_vocab * vocab_ = nullptr;
    EmbeddingCache cache_;

    int32_t n_embd_ = 0;
    int32_t n_vocab_ = 0;
    int32_t n_ctx_train_ = 0;
    int32_t n_threads_ = 1;
    bool has_vision_ = false;
    bool has_audio_ = false;
    int32_t audio_sample_rate_ = -1;
    bool uses_mrope_ = false;
    std::string description_;
    std::vector<MemoryEntry> projector_memory_;
    mutable std::once_flag pieces_once_;
    mutable std::vector<std::string> pieces_;

    void track_sessions(const std::vector<std::shared_ptr<Session>> & sessions);

    mutable std::mutex sessions_mutex_;
    std::vector<std::weak_ptr<Session>> sessions_;
    std::vector<std::weak_ptr<BatchRunner>> runners_;
};

}  // namespace llava_kv
