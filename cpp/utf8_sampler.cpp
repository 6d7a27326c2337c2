#include "utf8_sampler.h"

#include <cmath>
#include <cstdint>

namespace llava_kv {
namespace {

// Where a UTF-8 decoder is between characters: continuation bytes still needed, and the range the
// next one must lie in (narrower after E0, ED, F0 and F4: no overlong forms, surrogates, or code
// points past U+10FFFF; RFC 3629's table).
struct Utf8Position {
    uint8_t need = 0;
    uint8_t lo = 0x80;
    uint8_t hi = 0xBF;

    // Feeds `bytes`; false at the first byte that makes the text invalid.
    bool feed(const std::string & bytes) {
        for (unsigned char c : bytes) {
            if (need > 0) {
                if (c < lo || c > hi) {
                    return false;
                }
                need -= 1;
                lo = 0x80;
                hi = 0xBF;
            } else if (c >= 0x80 && !start(c)) {
                return false;
            }
        }
        return true;
    }

  private:
    bool start(unsigned char c) {
        if (c >= 0xC2 && c <= 0xDF) {
            need = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            need = 2;
            lo = c == 0xE0 ? 0xA0 : 0x80;
            hi = c == 0xED ? 0x9F : 0xBF;
        } else if (c >= 0xF0 && c <= 0xF4) {
            need = 3;
            lo = c == 0xF0 ? 0x90 : 0x80;
            hi = c == 0xF4 ? 0x8F : 0xBF;
        } else {
            return false;  // a stray continuation byte, C0/C1, or F5..FF
        }
        return true;
    }
};

struct Utf8Sampler {
    const llama_vocab * vocab;
    const std::vector<std::string> * pieces;
    Utf8Position at;
};

const char * utf8_name(const llama_sampler * /*smpl*/) {
    return "llava-kv-utf8";
}

void utf8_accept(llama_sampler * smpl, llama_token token) {
    auto * self = static_cast<Utf8Sampler *>(smpl->ctx);
    if (token >= 0 && static_cast<size_t>(token) < self->pieces->size() && !llama_vocab_is_eog(self->vocab, token)) {
        self->at.feed((*self->pieces)[static_cast<size_t>(token)]);
    }
}

void utf8_apply(llama_sampler * smpl, llama_token_data_array * cur_p) {
    const auto * self = static_cast<const Utf8Sampler *>(smpl->ctx);
    for (size_t i = 0; i < cur_p->size; ++i) {
        llama_token_data & cand = cur_p->data[i];
        if (std::isinf(cand.logit) && cand.logit < 0) {
            continue;  // already masked (the grammar)
        }
        bool ok = false;
        if (llama_vocab_is_eog(self->vocab, cand.id)) {
            ok = self->at.need == 0;
        } else if (cand.id >= 0 && static_cast<size_t>(cand.id) < self->pieces->size()) {
            Utf8Position next = self->at;
            ok = next.feed((*self->pieces)[static_cast<size_t>(cand.id)]);
        }
        if (!ok) {
            cand.logit = -INFINITY;
        }
    }
}

void utf8_reset(llama_sampler * smpl) {
    static_cast<Utf8Sampler *>(smpl->ctx)->at = Utf8Position{};
}

llama_sampler * utf8_clone(const llama_sampler * smpl);
llama_sampler_i * utf8_interface();

void utf8_free(llama_sampler * smpl) {
    delete static_cast<Utf8Sampler *>(smpl->ctx);
}

llama_sampler_i * utf8_interface() {
    static llama_sampler_i iface = [] {
        llama_sampler_i i{};  // the backend (on-device) hooks stay null: this stage runs on the host
        i.name = utf8_name;
        i.accept = utf8_accept;
        i.apply = utf8_apply;
        i.reset = utf8_reset;
        i.clone = utf8_clone;
        i.free = utf8_free;
        return i;
    }();
    return &iface;
}

llama_sampler * utf8_clone(const llama_sampler * smpl) {
    const auto * self = static_cast<const Utf8Sampler *>(smpl->ctx);
    return llama_sampler_init(utf8_interface(), new Utf8Sampler(*self));
}

}  // namespace

llama_sampler * make_utf8_sampler(const llama_vocab * vocab, const std::vector<std::string> * pieces) {
    return llama_sampler_init(utf8_interface(), new Utf8Sampler{vocab, pieces, {}});
}

}  // namespace llava_kv
