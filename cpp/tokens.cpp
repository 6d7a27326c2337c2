#include "tokens.h"

#include "errors.h"

namespace llava_kv {

std::vector<llama_token> tokenize_text(const llama_vocab * vocab, const std::string & text) {
    std::vector<llama_token> tokens(text.size() + 2);
    int32_t n = llama_tokenize(vocab, text.data(), static_cast<int32_t>(text.size()), tokens.data(),
                               static_cast<int32_t>(tokens.size()), false, true);
    if (n < 0) {
        tokens.resize(static_cast<size_t>(-n));
        n = llama_tokenize(vocab, text.data(), static_cast<int32_t>(text.size()), tokens.data(),
                           static_cast<int32_t>(tokens.size()), false, true);
    }
    if (n < 0) {
        throw Error("tokenization failed for a text of " + std::to_string(text.size()) + " bytes");
    }
    tokens.resize(static_cast<size_t>(n));
    return tokens;
}

size_t complete_utf8_prefix(const std::string & s) {
    size_t i = s.size();
    size_t back = 0;
    while (i > 0 && back < 4) {
        const unsigned char c = static_cast<unsigned char>(s[i - 1]);
        if ((c & 0xC0) != 0x80) {  // a lead byte or ASCII
            size_t need = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
            return back + 1 >= need ? s.size() : i - 1;
        }
        --i;
        ++back;
    }
    return s.size();  // not UTF-8 we can wait on: pass it through
}

std::string token_piece(const llama_vocab * vocab, llama_token token) {
    std::string piece(16, '\0');
    int32_t n = llama_token_to_piece(vocab, token, piece.data(), static_cast<int32_t>(piece.size()), 0, false);
    if (n < 0) {
        piece.resize(static_cast<size_t>(-n));
        n = llama_token_to_piece(vocab, token, piece.data(), static_cast<int32_t>(piece.size()), 0, false);
    }
    piece.resize(n > 0 ? static_cast<size_t>(n) : 0);
    return piece;
}

}  // namespace llava_kv
