// The reference evaluation llava-kv must agree with: mtmd_tokenize + mtmd_helper_eval_chunks on one
// prompt with media markers, in a fresh context (what llama-cpp-python's multimodal handler does).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model.h"
#include "session.h"

namespace llava_kv {

struct ReferenceResult {
    std::vector<int32_t> tokens;  // text tokens in prompt order (images as -1 per image token)
    int32_t n_past = 0;
    std::vector<float> logits;
};

ReferenceResult reference_eval(Model & model, const std::string & prompt, const std::vector<MediaInput> & images,
                               int32_t n_ctx, int32_t n_batch);

}  // namespace llava_kv
