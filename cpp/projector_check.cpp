#include "projector_check.h"

#include <memory>
#include <string>

#include "clip.h"  // clip_init without allocation: the projector's widths and buffer sizes
#include "device_limits.h"
#include "errors.h"
#include "ggml-backend.h"
#include "gguf.h"

namespace llava_kv {
namespace {

clip_flash_attn_type clip_flash_attn(llama_flash_attn_type type) {
    switch (type) {
        case LLAMA_FLASH_ATTN_TYPE_DISABLED: return CLIP_FLASH_ATTN_TYPE_DISABLED;
        case LLAMA_FLASH_ATTN_TYPE_ENABLED: return CLIP_FLASH_ATTN_TYPE_ENABLED;
        default: return CLIP_FLASH_ATTN_TYPE_AUTO;
    }
}

// The projector's encoders, read with no_alloc: metadata, tensor shapes and buffer sizes only.
struct Encoders {
    clip_init_result clip{nullptr, nullptr, nullptr};
    ~Encoders() {
        clip_free(clip.ctx_v);
        clip_free(clip.ctx_a);
        clip_free(clip.ctx_gen_a);
    }
};

// The device clip will put the projector on: the one asked for, else the first GPU, else the first
// integrated GPU (clip_ctx's own order); nullptr for the CPU.
ggml_backend_dev_t projector_device(const mtmd_context_params & params) {
    if (!params.use_gpu) {
        return nullptr;
    }
    if (params.device != nullptr) {
        return params.device;
    }
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU);
    return dev != nullptr ? dev : ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_IGPU);
}

// The projector's weights on `dev` as ggml lays them out (each tensor padded to the buffer type's
// alignment), refused where the device could not take them.
size_t check_weights_fit(const std::string & path, ggml_backend_dev_t dev) {
    ggml_context * meta = nullptr;
    gguf_init_params gparams = {true, &meta};
    std::unique_ptr<gguf_context, decltype(&gguf_free)> gguf(gguf_init_from_file(path.c_str(), gparams), &gguf_free);
    std::unique_ptr<ggml_context, decltype(&ggml_free)> tensors(meta, &ggml_free);
    if (!gguf || !tensors) {
        return 0;  // clip read it a moment ago; mtmd's own load says what is wrong if it cannot now
    }
    ggml_backend_buffer_type_t buft = ggml_backend_dev_buffer_type(dev);
    const std::string name = ggml_backend_dev_name(dev);
    const size_t align = ggml_backend_buft_get_alignment(buft);
    const size_t max_size = ggml_backend_buft_get_max_size(buft);
    const bool on_cpu = ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU;
    size_t needed = 0;
    for (ggml_tensor * t = ggml_get_first_tensor(meta); t != nullptr; t = ggml_get_next_tensor(meta, t)) {
        const size_t bytes = ggml_backend_buft_get_alloc_size(buft, t);
        needed += GGML_PAD(bytes, align);
        if (!on_cpu && (bytes > max_size || !device_takes(dev, t->type, t->ne[0], ggml_nrows(t)))) {
            throw ModelLoadError("the projector '" + path + "' has a tensor '" + ggml_get_name(t) + "' of " +
                                 human_bytes(double(bytes)) + ", more than one buffer on " + name + " can hold or address (" +
                                 human_bytes(double(max_size)) + " per buffer); load it with mmproj_use_gpu=False");
        }
    }
    size_t free = 0;
    size_t total = 0;
    ggml_backend_dev_memory(dev, &free, &total);
    if (!on_cpu && free > 0 && needed > free) {
        throw ModelLoadError("the projector '" + path + "' needs " + human_bytes(double(needed)) + " on " + name +
                             ", which has " + human_bytes(double(free)) + " free of " + human_bytes(double(total)) +
                             "; load it with mmproj_use_gpu=False, or free device memory");
    }
    return needed;
}

}  // namespace

std::map<ggml_backend_dev_t, size_t> check_projector(const std::string & path, const llama_model * text_model,
                                                     const mtmd_context_params & params) {
    // clip's no_alloc still allocates the weights' buffer (it only skips reading the data), so the
    // widths are read with the CPU backend, where an untouched allocation costs nothing and cannot fail
    // on a device limit; the device is checked from the tensor table.
    clip_context_params cparams = {};
    cparams.use_gpu = false;
    cparams.flash_attn_type = clip_flash_attn(params.flash_attn_type);
    cparams.image_min_tokens = params.image_min_tokens;
    cparams.image_max_tokens = params.image_max_tokens;
    cparams.warmup = false;
    cparams.no_alloc = true;
    Encoders encoders;
    encoders.clip = clip_init(path.c_str(), cparams);
    if (!encoders.clip.ctx_v && !encoders.clip.ctx_a) {
        return {};  // unreadable: mtmd's load fails the same way, before it allocates, and says why
    }
    const int32_t text_width = llama_model_n_embd_inp(text_model);
    for (const clip_ctx * encoder : {encoders.clip.ctx_v, encoders.clip.ctx_a, encoders.clip.ctx_gen_a}) {
        const int width = encoder != nullptr ? clip_n_mmproj_embd(encoder) : text_width;
        if (width != text_width) {
            throw ModelLoadError("the projector '" + path + "' makes embeddings of width " + std::to_string(width) +
                                 ", and the text model takes " + std::to_string(text_width) +
                                 ": it belongs to another model (n_embd " + std::to_string(width) + " vs " +
                                 std::to_string(text_width) + ")");
        }
    }
    ggml_backend_dev_t dev = projector_device(params);
    if (dev == nullptr) {
        dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    }
    return {{dev, check_weights_fit(path, dev)}};
}

}  // namespace llava_kv
