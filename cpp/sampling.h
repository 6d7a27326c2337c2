// Tokens in and out, shared by sessions and the batch runner: tokenizing, sampling, detokenizing.
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

// Tokens of `text` as mtmd tokenizes the text around media markers: special tokens parsed, none
// added (BOS is the caller's). Throws Error if tokenization fails.
std::vector<llama_token> tokenize_text(const llama_vocab * vocab, const std::string & text);

// llama.cpp's sampler chain for these settings (greedy when temperature <= 0).
// Throws std::invalid_argument for settings out of range.
llama_sampler_ptr make_sampler_chain(const SamplingParams & params, int32_t n_vocab);

// Length of the longest prefix of `s` that does not end inside a UTF-8 character.
size_t complete_utf8_prefix(const std::string & s);

// The bytes of one token as the model writes them (no special-token rendering).
std::string token_piece(const llama_vocab * vocab, llama_token token);

}  // namespace llava_kv
