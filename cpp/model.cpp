#include "model.h"

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <map>
#include <thread>

#include "batch_runner.h"
#include "device_ledger.h"
#include "device_limits.h"
#include "errors.h"
#include "ggml-backend.h"
#include "llama-ext.h"    // per-buffer memory breakdown of a context
#include "llama-model.h"  // per-buffer memory of the weights, before any context exists
#include "projector_check.h"
#include "session.h"
#include "tokens.h"

namespace llava_kv {

std::string buft_device_name(ggml_backend_buffer_type_t buft) {
    // Host buffers live in CPU memory: those without a device (mmapped weights, repacked CPU tensors)
    // and a GPU backend's pinned staging memory (Vulkan_Host, CUDA_Host), whose device is the GPU's.
    if (ggml_backend_buft_is_host(buft)) {
        return "CPU";
    }
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
    return dev != nullptr ? ggml_backend_dev_name(dev) : ggml_backend_buft_name(buft);
}

namespace {

std::string with_reason(std::string message) {
    const std::string reason = take_logged_errors();
    if (!reason.empty()) {
        message += "\nllama.cpp said:\n" + reason;
    }
    return message;
}

}  // namespace

Model::Model(std::string path, std::string mmproj_path, const ModelParams & params)
    : path_(std::move(path)),
      mmproj_path_(std::move(mmproj_path)),
      params_(params),
      verbosity_(params.verbose),
      cache_(params.embed_cache_bytes) {}

std::shared_ptr<Model> Model::load(const std::string & model_path, const std::string & mmproj_path,
                                   const ModelParams & params) {
    ensure_runtime();
    if (params.n_gpu_layers < -1) {
        throw std::invalid_argument("n_gpu_layers must be >= 0, or -1 for all layers");
    }
    if (params.n_threads < 0) {
        throw std::invalid_argument("n_threads must be >= 1 (or 0/None for one per core)");
    }
    if (params.type_v != GGML_TYPE_F16 && params.flash_attn == LLAMA_FLASH_ATTN_TYPE_DISABLED) {
        throw std::invalid_argument(std::string("a ") + ggml_type_name(params.type_v) + " V cache (kv_type='" +
                                    kv_type_name(params) + "') needs flash attention, and flash_attn='off': "
                                    "llama.cpp quantizes the V cache only with it (use flash_attn='auto' or 'on', "
                                    "or an f16 V cache)");
    }
    for (const std::string * p : {&model_path, &mmproj_path}) {
        if (!p->empty() && !std::filesystem::is_regular_file(*p)) {
            throw ModelLoadError("no such model file: '" + *p + "'");
        }
    }
    std::shared_ptr<Model> self(new Model(model_path, mmproj_path, params));
    take_logged_errors();

    watch_device_buffers();
    ggml_backend_dev_t main_gpu = nullptr;
    if (!params.main_gpu.empty()) {
        main_gpu = device_by_name(params.main_gpu);
        if (ggml_backend_dev_type(main_gpu) == GGML_BACKEND_DEVICE_TYPE_CPU) {
            throw std::invalid_argument("main_gpu names a device other than the CPU ('" + params.main_gpu +
                                        "' is the CPU); to keep everything on the CPU, load with n_gpu_layers=0 "
                                        "and mmproj_use_gpu=False");
        }
    }
    ggml_backend_dev_t only_device[] = {main_gpu, nullptr};

    llama_model_params mparams = llama_model_default_params();
    mparams.n_gpu_layers = params.n_gpu_layers < 0 ? 999 : params.n_gpu_layers;
    if (main_gpu != nullptr) {
        mparams.devices = only_device;
    }
    {
        LedgerOwner owner("weights");
        self->model_.reset(llama_model_load_from_file(model_path.c_str(), mparams));
    }
    if (!self->model_) {
        throw ModelLoadError(with_reason("could not load the text model '" + model_path +
                                         "': not a readable GGUF of a supported architecture"));
    }
    for (uint32_t il = 0; il < self->model_->hparams.n_layer(); ++il) {
        for (const auto & [type, head] : {std::pair(params.type_k, self->model_->hparams.n_embd_head_k(il)),
                                          std::pair(params.type_v, self->model_->hparams.n_embd_head_v(il))}) {
            const int64_t block = ggml_blck_size(type);
            if (head % block != 0) {
                self->model_.reset();
                throw std::invalid_argument(std::string("kv_type '") + ggml_type_name(type) + "' packs " +
                                            std::to_string(block) + " values a block, which does not divide this "
                                            "model's attention heads of " + std::to_string(head) +
                                            " values: use kv_type='f16'");
            }
        }
    }
    self->vocab_ = llama_model_get_vocab(self->model_.get());
    self->n_embd_ = llama_model_n_embd(self->model_.get());
    self->n_vocab_ = llama_vocab_n_tokens(self->vocab_);
    self->n_ctx_train_ = llama_model_n_ctx_train(self->model_.get());
    char desc[256] = {0};
    llama_model_desc(self->model_.get(), desc, sizeof(desc));
    self->description_ = desc;
    unsigned hw = std::max(1u, std::thread::hardware_concurrency());
    self->n_threads_ = params.n_threads > 0 ? params.n_threads : static_cast<int32_t>(hw);

    if (!mmproj_path.empty()) {
        mtmd_context_params pparams = mtmd_context_params_default();
        pparams.use_gpu = params.mmproj_use_gpu;
        pparams.n_threads = self->n_threads_;
        pparams.print_timings = false;
        pparams.warmup = false;
        pparams.device = main_gpu;
        std::map<ggml_backend_dev_t, size_t> usage;
        try {
            usage = check_projector(mmproj_path, self->model_.get(), pparams);
        } catch (...) {
            self->model_.reset();
            throw;
        }
        {
            LedgerOwner owner("projector");
            self->projector_.reset(mtmd_init_from_file(mmproj_path.c_str(), self->model_.get(), pparams));
        }
        if (!self->projector_) {
            // Free the weights now rather than when the last reference goes.
            self->model_.reset();
            throw ModelLoadError(with_reason("could not load the projector '" + mmproj_path + "' for model '" +
                                             model_path + "'"));
        }
        self->has_vision_ = mtmd_support_vision(self->projector_.get());
        self->has_audio_ = mtmd_support_audio(self->projector_.get());
        self->audio_sample_rate_ = mtmd_get_audio_sample_rate(self->projector_.get());
        self->uses_mrope_ = mtmd_decode_use_mrope(self->projector_.get());
        for (const auto & [dev, bytes] : usage) {
            self->projector_memory_.push_back(
                {"projector", dev ? ggml_backend_dev_name(dev) : "CPU", bytes});
        }
    }
    return self;
}

Model::~Model() { close(); }

void Model::close() {
    // Runner threads take short holds in a loop: ask them to stop first, or this lock could wait on
    // them; calls in flight on sessions stop at their next decode step rather than run to the end.
    for (const auto & runner : live_runners()) {
        runner->request_stop();
    }
    for (const auto & session : live_sessions()) {
        session->begin_close();
    }
    std::unique_lock<std::shared_mutex> lock(lifetime_);
    if (closed_.load()) {
        return;
    }
    closed_.store(true);
    std::vector<std::weak_ptr<Session>> sessions;
    std::vector<std::weak_ptr<BatchRunner>> runners;
    {
        std::lock_guard<std::mutex> guard(sessions_mutex_);
        sessions.swap(sessions_);
        runners.swap(runners_);
    }
    for (auto & weak : runners) {
        if (auto runner = weak.lock()) {
            runner->close();
        }
    }
    for (auto & weak : sessions) {
        if (auto session = weak.lock()) {
            session->close_for_model();
        }
    }
    cache_.clear();
    projector_.reset();
    model_.reset();
}

std::shared_lock<std::shared_mutex> Model::hold() const {
    std::shared_lock<std::shared_mutex> lock(lifetime_);
    if (closed_.load()) {
        throw ClosedError("the model '" + path_ + "' is closed");
    }
    return lock;
}

std::shared_lock<std::shared_mutex> Model::try_hold() const {
    std::shared_lock<std::shared_mutex> lock(lifetime_, std::try_to_lock);
    if (lock.owns_lock() && closed_.load()) {
        lock.unlock();
    }
    return lock;
}

void Model::track_runner(const std::shared_ptr<BatchRunner> & runner) {
    auto lock = hold();
    std::lock_guard<std::mutex> guard(sessions_mutex_);
    runners_.erase(std::remove_if(runners_.begin(), runners_.end(), [](const auto & w) { return w.expired(); }),
                   runners_.end());
    runners_.push_back(runner);
}

std::shared_ptr<Session> Model::open_session(const SessionParams & params) {
    auto lock = hold();
    auto session = std::make_shared<Session>(shared_from_this(), params);
    track_sessions({session});
    return session;
}

std::vector<std::shared_ptr<Session>> Model::open_pool(const SessionParams & params, int32_t n_slots) {
    auto lock = hold();
    auto slots = open_session_pool(shared_from_this(), params, n_slots);
    track_sessions(slots);
    return slots;
}

void Model::track_sessions(const std::vector<std::shared_ptr<Session>> & sessions) {
    std::lock_guard<std::mutex> guard(sessions_mutex_);
    sessions_.erase(std::remove_if(sessions_.begin(), sessions_.end(),
                                   [](const std::weak_ptr<Session> & w) { return w.expired(); }),
                    sessions_.end());
    sessions_.insert(sessions_.end(), sessions.begin(), sessions.end());
}

namespace {

// The objects of `weak` still alive and not closed.
template <typename T>
std::vector<std::shared_ptr<T>> still_open(const std::vector<std::weak_ptr<T>> & weak) {
    std::vector<std::shared_ptr<T>> out;
    for (const auto & w : weak) {
        if (auto p = w.lock(); p && !p->closed()) {
            out.push_back(std::move(p));
        }
    }
    return out;
}

}  // namespace

std::vector<std::shared_ptr<Session>> Model::live_sessions() const {
    std::lock_guard<std::mutex> guard(sessions_mutex_);
    return still_open(sessions_);
}

std::vector<std::shared_ptr<BatchRunner>> Model::live_runners() const {
    std::lock_guard<std::mutex> guard(sessions_mutex_);
    return still_open(runners_);
}

llama_context_params Model::context_params(int32_t n_threads) const {
    llama_context_params cparams = llama_context_default_params();
    const int32_t threads = n_threads > 0 ? n_threads : n_threads_;
    cparams.n_threads = threads;
    cparams.n_threads_batch = threads;
    cparams.flash_attn_type = params_.flash_attn;
    cparams.type_k = params_.type_k;
    cparams.type_v = params_.type_v;
    cparams.no_perf = true;
    return cparams;
}

void ContextDeleter::operator()(llama_context * ctx) const {
    llama_free(ctx);
    if (threads != nullptr) {
        free_threads(threads);
    }
}

namespace {
std::atomic<uint64_t> g_threads_rested{0};
}  // namespace

void rest_threads(const ContextPtr & ctx) {
    const CpuThreadPoolApi & api = cpu_threadpool_api();
    if (ctx && ctx.get_deleter().threads != nullptr && api.pause != nullptr) {
        api.pause(ctx.get_deleter().threads);
        g_threads_rested.fetch_add(1);
    }
}

uint64_t threads_rested() {
    return g_threads_rested.load();
}

ContextPtr Model::new_context(const llama_context_params & cparams) const {
    ContextPtr ctx(llama_init_from_model(model_.get(), cparams));
    const CpuThreadPoolApi & api = cpu_threadpool_api();
    if (!ctx || api.create == nullptr) {
        return ctx;  // no pool to attach: llama.cpp's own (a build with OpenMP computes on its team)
    }
    ggml_threadpool_params tpp = ggml_threadpool_params_default(std::max(cparams.n_threads, cparams.n_threads_batch));
    // After a graph the workers poll for the next one briefly (level 1: about 131k pause rounds, a few
    // ms) before they sleep. A stream returns to Python between tokens; with level 0 the workers slept
    // in that gap and each token paid a wake-up, which on a VM after an idle spell cost 0.5-1 ms per
    // token on the tiny preset (0.1 ms with level 1). Past those few ms an idle context's cores are free.
    tpp.poll = 1;
    ggml_threadpool_t pool = api.create(&tpp);
    if (pool == nullptr) {
        return ctx;  // llama.cpp then makes a pool per graph: slower, still correct
    }
    llama_attach_threadpool(ctx.get(), pool, pool);
    // The pool must outlive the context: the deleter frees the context first.
    return ContextPtr(ctx.release(), ContextDeleter{pool, api.destroy});
}

std::vector<ggml_backend_dev_t> Model::weight_devices() const {
    std::vector<ggml_backend_dev_t> out;
    for (const auto & [buft, bytes] : model_->memory_breakdown()) {
        ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
        if (dev != nullptr && !ggml_backend_buft_is_host(buft) && bytes > 0 &&
            std::find(out.begin(), out.end(), dev) == out.end()) {
            out.push_back(dev);
        }
    }
    return out;
}

std::string kv_type_name(const ModelParams & params) {
    const std::string k = ggml_type_name(params.type_k);
    return params.type_k == params.type_v ? k : k + "/" + ggml_type_name(params.type_v);
}

std::string Model::placement() const {
    std::string out;
    for (ggml_backend_dev_t dev : weight_devices()) {
        out += (out.empty() ? "" : "+") + std::string(ggml_backend_dev_name(dev));
    }
    const int32_t n_layer = llama_model_n_layer(model_.get());
    if (out.empty()) {
        return "CPU";
    }
    return params_.n_gpu_layers >= 0 && params_.n_gpu_layers < n_layer ? out + "+CPU" : out;
}

void Model::check_context_memory(int64_t n_cells) const {
    const llama_model * m = model_.get();
    const int64_t n_head = std::max(1, llama_model_n_head(m));
    const int64_t kv_width = int64_t(llama_model_n_embd(m)) / n_head * std::max(1, llama_model_n_head_kv(m));
    const auto tensor_bytes = [&](ggml_type type) {
        return double(n_cells) * double(kv_width) * double(ggml_type_size(type)) / double(ggml_blck_size(type));
    };
    const double layer_bytes = std::max(tensor_bytes(params_.type_k), tensor_bytes(params_.type_v));  // the larger
    const double needed = (tensor_bytes(params_.type_k) + tensor_bytes(params_.type_v)) * llama_model_n_layer(m);
    const double cell_bytes = needed / double(std::max<int64_t>(n_cells, 1));
    std::vector<ggml_backend_dev_t> holders = weight_devices();
    for (ggml_backend_dev_t dev : holders) {
        const auto takes = [&](int64_t cells) {
            return device_takes(dev, params_.type_k, kv_width, cells) &&
                   device_takes(dev, params_.type_v, kv_width, cells);
        };
        if (!takes(n_cells)) {
            // The largest cache whose tensors the device still takes, halving down from the request.
            int64_t fits = n_cells;
            while (fits > 1 && !takes(fits)) {
                fits /= 2;
            }
            throw ContextFullError(n_cells, fits,
                                   "a context of " + std::to_string(n_cells) + " KV cells needs K and V tensors of " +
                                       human_bytes(layer_bytes) + " per layer, more than " + ggml_backend_dev_name(dev) +
                                       " can address in one tensor (about " + std::to_string(fits) +
                                       " cells fit); ask for a smaller n_ctx");
        }
    }
    if (llama_model_n_swa(m) > 0) {
        return;
    }
    if (holders.empty()) {
        holders.push_back(ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU));
    }
    for (ggml_backend_dev_t dev : holders) {
        size_t free = 0;
        size_t total = 0;
        ggml_backend_dev_memory(dev, &free, &total);
        if (free > 0 && needed > double(free)) {
            throw ContextFullError(n_cells, static_cast<long long>(double(free) / cell_bytes),
                                   "a context of " + std::to_string(n_cells) + " KV cells needs at least " +
                                       human_bytes(needed) + " for its cache on " + ggml_backend_dev_name(dev) +
                                       ", which has " + human_bytes(double(free)) + " free of " + human_bytes(double(total)) +
                                       "; ask for a smaller n_ctx");
        }
    }
}

std::vector<MemoryEntry> context_memory(llama_context * ctx, const MemoryEntry & tag) {
    std::map<std::string, std::pair<size_t, size_t>> by_device;
    for (const auto & [buft, data] : llama_get_memory_breakdown(ctx)) {
        auto & slot = by_device[buft_device_name(buft)];
        slot.first += data.context;
        slot.second += data.compute;
    }
    std::vector<MemoryEntry> out;
    for (const auto & [device, sizes] : by_device) {
        for (const auto & [component, bytes] : {std::pair{"kv", sizes.first}, std::pair{"compute", sizes.second}}) {
            if (bytes) {
                MemoryEntry e = tag;
                e.component = component;
                e.device = device;
                e.bytes = bytes;
                out.push_back(std::move(e));
            }
        }
    }
    return out;
}

MemoryReport Model::memory() const {
    auto lock = hold();
    MemoryReport report;
    std::map<std::string, size_t> weights;
    for (const auto & [buft, bytes] : model_->memory_breakdown()) {
        weights[buft_device_name(buft)] += bytes;
    }
    for (const auto & [device, bytes] : weights) {
        report.entries.push_back({"weights", device, bytes});
    }
    for (const auto & entry : projector_memory_) {
        report.entries.push_back(entry);
    }
    report.entries.push_back({"embedding_cache", "CPU", cache_.stats().bytes});
    for (const auto & session : live_sessions()) {
        for (auto & entry : session->memory_entries()) {
            report.entries.push_back(std::move(entry));
        }
    }
    for (const auto & runner : live_runners()) {
        for (auto & entry : runner->memory_entries()) {
            report.entries.push_back(std::move(entry));
        }
    }
    report.devices = devices();
    return report;
}

}  // namespace llava_kv

namespace llava_kv {

std::string Model::chat_template() const {
    auto lock = hold();
    const char * tmpl = llama_model_chat_template(model_.get(), nullptr);
    return tmpl ? tmpl : "";
}

std::string Model::apply_chat_template(const std::vector<std::pair<std::string, std::string>> & messages,
                                       bool add_assistant, const std::string & template_override) const {
    const std::string tmpl = template_override.empty() ? chat_template() : template_override;
    if (tmpl.empty()) {
        throw Error("the model '" + path_ + "' has no chat template; pass chat_template=... (a name such as "
                    "'chatml' or a template string)");
    }
    std::vector<llama_chat_message> chat;
    size_t total = 0;
    for (const auto & [role, content] : messages) {
        chat.push_back({role.c_str(), content.c_str()});
        total += role.size() + content.size();
    }
    std::string out(2 * total + 256, '\0');
    int32_t n = llama_chat_apply_template(tmpl.c_str(), chat.data(), chat.size(), add_assistant, out.data(),
                                          static_cast<int32_t>(out.size()));
    if (n > static_cast<int32_t>(out.size())) {
        out.resize(static_cast<size_t>(n));
        n = llama_chat_apply_template(tmpl.c_str(), chat.data(), chat.size(), add_assistant, out.data(),
                                      static_cast<int32_t>(out.size()));
    }
    if (n < 0) {
        throw Error("llama.cpp does not support this chat template; pass chat_template= with a supported name "
                    "(e.g. 'chatml', 'llama3', 'gemma')");
    }
    out.resize(static_cast<size_t>(n));
    return out;
}

std::vector<llama_token> Model::tokenize(const std::string & text, bool add_special) const {
    std::vector<llama_token> tokens = tokenize_text(vocab_, text);
    if (add_special && llama_vocab_get_add_bos(vocab_)) {
        tokens.insert(tokens.begin(), llama_vocab_bos(vocab_));
    }
    return tokens;
}

void Model::check_token_ids(const std::vector<llama_token> & tokens) const {
    for (llama_token t : tokens) {
        if (t < 0 || t >= n_vocab_) {
            throw std::invalid_argument("token id " + std::to_string(t) + " is outside the vocabulary (0.." +
                                        std::to_string(n_vocab_ - 1) + ")");
        }
    }
}

std::vector<std::string> Model::pieces_of(const std::vector<llama_token> & tokens) const {
    check_token_ids(tokens);
    std::vector<std::string> out;
    out.reserve(tokens.size());
    for (llama_token t : tokens) {
        out.push_back(token_piece(vocab_, t));
    }
    return out;
}

const std::vector<std::string> & Model::token_pieces() const {
    std::call_once(pieces_once_, [this] {
        pieces_.reserve(static_cast<size_t>(n_vocab_));
        for (llama_token t = 0; t < n_vocab_; ++t) {
            pieces_.push_back(token_piece(vocab_, t));
        }
    });
    return pieces_;
}

}  // namespace llava_kv
