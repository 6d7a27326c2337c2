// llama.cpp's sampler chain for the settings sessions and the batch runner take, and drawing one
// token with it.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "llama-cpp.h"
#include "model.h"

namespace llava_kv {

struct SamplingParams {
    float temperature = 0.0f;  // <= 0: greedy
    int32_t top_k = 40;
    float top_p = 0.95f;
    float min_p = 0.05f;
    float repeat_penalty = 1.0f;
    int32_t repeat_last_n = 64;
    float presence_penalty = 0.0f;   // OpenAI's: subtracted once from every token already generated
    float frequency_penalty = 0.0f;  // OpenAI's: subtracted per occurrence
    std::vector<std::pair<llama_token, float>> logit_bias;  // added to a token's logit before sampling
    std::string grammar;  // GBNF (root rule "root"); empty: unconstrained
    uint32_t seed = 0;
};

// llama.cpp's sampler chain for these settings (greedy when temperature <= 0): penalties, logit
// bias, the grammar and a stage that keeps the text valid UTF-8 (utf8_sampler.h) (so every later
// stage sees only tokens they allow), then greedy or
// top-k/top-p/min-p/temperature/draw. Throws std::invalid_argument for settings out of range, a
// token id outside the vocabulary, or a grammar llama.cpp cannot parse (with its parser's message).
llama_sampler_ptr make_sampler_chain(const SamplingParams & params, const Model & model);

// The token `chain` draws from `logits` (n_vocab of them); nothing is accepted. Throws GrammarError
// when the grammar allows no token at all here (every candidate masked).
llama_token draw_token(llama_sampler * chain, const float * logits, int32_t n_vocab);

}  // namespace llava_kv
