#include "reference.h"

#include <algorithm>

#include "image_encoder.h"

#include "errors.h"
#include "mtmd-helper.h"

namespace llava_kv {

ReferenceResult reference_eval(Model & model, const std::string & prompt, const std::vector<MediaInput> & images,
                               int32_t n_ctx, int32_t n_batch) {
    auto hold = model.hold();
    if (model.projector() == nullptr) {
        throw Error("reference_eval needs a model loaded with a projector");
    }
    llama_context_params cparams = model.context_params(0);
    cparams.n_ctx = static_cast<uint32_t>(n_ctx);
    cparams.n_batch = static_cast<uint32_t>(n_batch);
    cparams.n_ubatch = static_cast<uint32_t>(n_batch);
    cparams.n_seq_max = 1;
    ContextPtr ctx = model.new_context(cparams);
    if (!ctx) {
        throw Error("reference_eval: could not create a context");
    }
    std::vector<mtmd::bitmap_ptr> bitmaps;
    std::vector<const mtmd_bitmap *> raw;
    for (const auto & img : images) {
        bitmaps.push_back(make_bitmap(model, img));
        raw.push_back(bitmaps.back().get());
    }
    mtmd::input_chunks_ptr chunks(mtmd_input_chunks_init());
    mtmd_input_text text{prompt.c_str(), prompt.size(), true, true};
    std::lock_guard<std::mutex> lock(model.projector_mutex());
    if (mtmd_tokenize(model.projector(), chunks.get(), &text, raw.data(), raw.size()) != 0) {
        // mtmd does not say which input it refused: only clips means a clip; any image keeps ImageError.
        const bool clips_only = !images.empty() && std::all_of(images.begin(), images.end(),
                                                               [](const MediaInput & x) { return x.is_audio(); });
        if (clips_only) {
            throw AudioError("reference_eval: mtmd_tokenize failed");
        }
        throw ImageError("reference_eval: mtmd_tokenize failed");
    }
    ReferenceResult result;
    for (size_t i = 0; i < mtmd_input_chunks_size(chunks.get()); ++i) {
        const mtmd_input_chunk * chunk = mtmd_input_chunks_get(chunks.get(), i);
        if (mtmd_input_chunk_get_type(chunk) == MTMD_INPUT_CHUNK_TYPE_TEXT) {
            size_t n = 0;
            const llama_token * tokens = mtmd_input_chunk_get_tokens_text(chunk, &n);
            result.tokens.insert(result.tokens.end(), tokens, tokens + n);
        } else {
            result.tokens.insert(result.tokens.end(), mtmd_input_chunk_get_n_tokens(chunk), -1);
        }
    }
    llama_pos n_past = 0;
    if (mtmd_helper_eval_chunks(model.projector(), ctx.get(), chunks.get(), 0, 0, n_batch, true, &n_past) != 0) {
        throw Error("reference_eval: mtmd_helper_eval_chunks failed");
    }
    result.n_past = n_past;
    const float * logits = llama_get_logits_ith(ctx.get(), -1);
    if (logits != nullptr) {
        result.logits.assign(logits, logits + model.n_vocab());
    }
    return result;
}

}  // namespace llava_kv
