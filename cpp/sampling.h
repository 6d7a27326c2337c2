// llama.cpp's sampler chain for the settings sessions and the batch runner take.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "llama-cpp.h"

namespace llava_kv {

struct SamplingParams {
    float temperature = 0.0f;  // <= 0: greedy
    int32_t top_k = 40;
    float top_p = 0.95f;
    float min_p = 0.05f;
    float repeat_penalty = 1.0f;
    int32_t repeat_last_n = 64;
    uint32_t seed = 0;
};

// llama.cpp's sampler chain for these settings (greedy when temperature <= 0).
// Throws std::invalid_argument for settings out of range.
llama_sampler_ptr make_sampler_chain(const SamplingParams & params, int32_t n_vocab);

}  // namespace llava_kv
