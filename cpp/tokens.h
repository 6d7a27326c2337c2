// Text to tokens and tokens to text, as sessions and the batch runner both need them.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "llama.h"

namespace llava_kv {

// Tokens of `text` as mtmd tokenizes the text around media markers: special tokens parsed, none
// added (BOS is the caller's). Throws Error if tokenization fails.
std::vector<llama_token> tokenize_text(const llama_vocab * vocab, const std::string & text);

// Length of the longest prefix of `s` that does not end inside a UTF-8 character.
size_t complete_utf8_prefix(const std::string & s);

// The bytes of one token as the model writes them (no special-token rendering).
std::string token_piece(const llama_vocab * vocab, llama_token token);

}  // namespace llava_kv
