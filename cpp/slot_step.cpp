#include "slot_step.h"

#include <algorithm>

#include "decode.h"
#include "llama-ext.h"
#include "errors.h"
#include "tokens.h"

namespace llava_kv {

void draw_slots(const Model & model, std::vector<StepSlot *> & slots) {
    for (StepSlot * s : slots) {
        if (s->reply == nullptr || s->logits == nullptr || s->reply->done() || s->token >= 0) {
            continue;
        }
        const float * logits = s->logits;
        s->logits = nullptr;
        const llama_token token = s->reply->draw(logits);
        if (token < 0) {
            continue;  // ended here: nothing to decode
        }
        s->piece = model.token_pieces()[static_cast<size_t>(token)];
        s->reply->accept(token, s->piece);
        if (s->keep_last || !s->reply->done()) {
            s->token = token;  // to decode
        }
    }
}

namespace {

int32_t fill_step_batch(llama_batch_ext * batch, std::vector<StepSlot *> slots, int32_t n_batch,
                        int32_t & n_slots) {
    // In sequence order: a context with a KV stream per sequence (a pool, the batch runner) splits a
    // batch into ubatches of consecutive sequence ids, so slots 3, 2, 1, 0 would cost four graph
    // computations where 0, 1, 2, 3 cost one (measured on tiny-llava: 0.47 vs 0.17 ms a step).
    std::stable_sort(slots.begin(), slots.end(), [](const StepSlot * a, const StepSlot * b) { return a->seq < b->seq; });
    llama_batch_ext_clear(batch);
    int32_t room = n_batch;
    n_slots = 0;
    // Drawn tokens first (one per sequence), then prompt text as room allows.
    for (StepSlot * s : slots) {
        s->out = -1;
        s->prompt_taken = 0;
        s->bad_logits = false;
        if (s->token < 0 || room == 0) {
            continue;
        }
        const int32_t idx = llama_batch_ext_add_token(batch, s->seq, s->token);
        if (idx < 0) {
            throw Error("could not build the batched step (more sequences than the batch holds?)");
        }
        llama_batch_ext_set_pos(batch, idx, &s->pos);
        llama_batch_ext_set_output_logits(batch, idx, true);
        s->out = idx;
        room -= 1;
        n_slots += 1;
    }
    for (StepSlot * s : slots) {
        if (s->n_prompt == 0 || room == 0 || s->out >= 0) {
            continue;
        }
        int32_t idx = -1;
        while (s->prompt_taken < s->n_prompt && room > 0) {
            idx = llama_batch_ext_add_token(batch, s->seq, s->prompt[s->prompt_taken]);
            if (idx < 0) {
                throw Error("could not build the batched step (more tokens than the batch holds?)");
            }
            const llama_pos p = s->pos + static_cast<llama_pos>(s->prompt_taken);
            llama_batch_ext_set_pos(batch, idx, &p);
            s->prompt_taken += 1;
            room -= 1;
        }
        if (s->prompt_taken == s->n_prompt) {
            llama_batch_ext_set_output_logits(batch, idx, true);
            s->out = idx;
        }
        n_slots += 1;
    }
    return n_batch - room;
}

void take_step_outputs(llama_context * ctx, int32_t n_vocab, std::vector<StepSlot *> & slots) {
    for (StepSlot * s : slots) {
        if (s->prompt_taken > 0) {
            s->pos += static_cast<llama_pos>(s->prompt_taken);
            s->prompt += s->prompt_taken;
            s->n_prompt -= s->prompt_taken;
        } else if (s->out >= 0) {
            s->pos += 1;  // the drawn token, now decoded
            s->token = -1;
        }
        if (s->out < 0) {
            continue;
        }
        const float * logits = llama_get_logits_ith(ctx, s->out);
        if (logits == nullptr || !all_finite(logits, static_cast<size_t>(n_vocab))) {
            s->bad_logits = true;
            s->logits = nullptr;
        } else {
            s->logits = logits;
        }
    }
}

}  // namespace

StepDecode decode_slots(llama_context * ctx, llama_batch_ext * batch, std::vector<StepSlot *> & slots,
                        int32_t n_batch, const std::function<int32_t(llama_batch_ext *)> & decode) {
    StepDecode r;
    r.n_tokens = fill_step_batch(batch, slots, n_batch, r.n_slots);
    if (r.n_tokens == 0) {
        return r;
    }
    r.status = decode(batch);
    if (r.status == 0) {
        take_step_outputs(ctx, llama_vocab_n_tokens(llama_model_get_vocab(llama_get_model(ctx))), slots);
    }
    return r;
}

}  // namespace llava_kv
