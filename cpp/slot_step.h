// The step every generation path runs: sequences of one context draw their next tokens (Reply),
// and one llama_process call decodes every token to keep plus the prompt tokens that fit. A pool's
// slots (Session::step_together), generate_branches() and the batch runner are callers of these
// two functions; what differs is only where logits come from and what a failure undoes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model.h"
#include "reply.h"

struct llama_batch_ext;  // llama-ext.h, private to the core's sources

namespace llava_kv {

struct StepSlot {
    llama_seq_id seq = 0;
    Reply * reply = nullptr;
    const float * logits = nullptr;  // what the reply draws from next; null: nothing yet
    llama_pos pos = 0;               // where its next token goes
    // Decode the token that ended the reply too (a session's timeline keeps every token it accepted;
    // a branch or a batch job's sequence is dropped, so its last token is never decoded).
    bool keep_last = false;
    const llama_token * prompt = nullptr;  // prompt tokens still to decode; logits come after the last
    size_t n_prompt = 0;

    // What the step did.
    llama_token token = -1;  // drawn and accepted, waiting to be decoded (-1: none)
    std::string piece;       // the bytes of the token drawn last
    size_t prompt_taken = 0;  // prompt tokens carried by the last decode
    int32_t out = -1;         // batch index of its logits in the last decode (-1: none)
    bool bad_logits = false;  // the last decode gave it no finite logits
};

// Each slot with logits and a reply still going draws its next token and accepts it (the reply
// may end: an end-of-generation token or a dead grammar ends it undrawn, a stop string or the
// token limit after this token). `logits` is used up.
void draw_slots(const Model & model, std::vector<StepSlot *> & slots);

struct StepDecode {
    int32_t status = 0;     // llama_process's (0: decoded), or decode.h's own statuses
    int32_t n_tokens = 0;   // tokens carried
    int32_t n_slots = 0;    // sequences carried
};

// One decode of every slot's drawn token (one each, where the reply goes on or keep_last) and then
// of prompt tokens in sequence order while `n_batch` has room. On success every slot that asked for
// logits has them in `logits` (or bad_logits), its token is decoded (token -1, pos advanced) and its
// prompt advanced. `decode` runs the call (the caller's fault hooks and status mapping). On failure
// nothing in the slots changed but `out` (the batch index each was given: the caller drops the cells
// those tokens went to).
StepDecode decode_slots(llama_context * ctx, llama_batch_ext * batch, std::vector<StepSlot *> & slots,
                        int32_t n_batch, const std::function<int32_t(llama_batch_ext *)> & decode);

}  // namespace llava_kv
