// A sampler stage that keeps generated text valid UTF-8 (used with a grammar). llama.cpp's grammar
// matches code points, and its UTF-8 decoder lets through byte sequences Python and JSON parsers
// refuse (surrogates, overlong forms, code points past U+10FFFF): a string of maxLength 6 could
// become twelve U+FFFD once decoded. This stage masks every token whose bytes would make the text
// so far invalid UTF-8, and the end of generation while a character is incomplete.
#pragma once

#include <string>
#include <vector>

#include "llama.h"

namespace llava_kv {

// `pieces[t]`: the bytes of token t (Model::token_pieces()); they must outlive the sampler.
llama_sampler * make_utf8_sampler(const llama_vocab * vocab, const std::vector<std::string> * pieces);

}  // namespace llava_kv
