// Session's generation: sampling one token at a time, and the batched step of a pool's slots.
#include <new>
#include <set>

#include "errors.h"
#include "llama-ext.h"
#include "sampling.h"
#include "session.h"
#include "slot_step.h"
#include "stop_strings.h"

namespace llava_kv {

void Session::begin_generation(const ReplyParams & p) {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(shared_->mutex);
    check_open();
    reply_ = std::make_unique<Reply>(*model_, p);
    reply_cancel_.store(false);
}

void Session::check_has_logits_locked() const {
    if (!registry_->has_logits()) {
        throw Error(registry_->timeline().empty()
                        ? "nothing to generate from: the session is empty"
                        : "nothing to generate from: the timeline ends with image tokens; append text first");
    }
}

void Session::check_reply_locked() {
    if (!reply_) {
        throw Error("generate_step() before begin_generation()");
    }
    if (reply_->done()) {
        throw Error("the generation has ended (" + reply_->finish_reason() + "); begin_generation() starts another");
    }
    check_has_logits_locked();
}

void Session::report_locked(GenerationStep & step) {
    step.text += reply_->take_text();
    step.n_tokens += reply_->take_n_tokens();
    for (TokenLogprob & e : reply_->take_logprobs()) {
        step.logprobs.push_back(std::move(e));
    }
    step.done = reply_->done();
    step.finish_reason = reply_->finish_reason();
    step.error = reply_->error();
    step.end_of_generation = reply_->ended_on_eog();
}

llama_token Session::lone_step_locked() {
    check_reply_locked();
    Reply::Saved saved = reply_->save();
    try {
        // Drawn as a pool slot draws (slot_step.h); the registry decodes the token itself.
        StepSlot slot;
        slot.reply = reply_.get();
        slot.logits = registry_->logits().data();
        slot.keep_last = true;
        std::vector<StepSlot *> one{&slot};
        draw_slots(*model_, one);
        if (slot.token < 0) {
            return slot.token;  // ended here: nothing to decode
        }
        registry_->append_generated(slot.token, slot.piece);
        stats_.tokens_generated += 1;
        return slot.token;
    } catch (...) {
        reply_->restore(std::move(saved));
        throw;
    }
}

GenerationStep Session::generate_step() {
    return run_edit([&] {
        GenerationStep step;
        step.token = lone_step_locked();
        report_locked(step);
        return step;
    });
}

GenerationStep Session::advance(int32_t max_steps, bool until_text) {
    if (max_steps < 1) {
        throw std::invalid_argument("max_steps must be >= 1, got " + std::to_string(max_steps));
    }
    // Each step is whole or undone by itself: a failure keeps the steps before it (and their counters).
    return run_edit(
        [&] {
            GenerationStep acc;
            acc.token = lone_step_locked();
            for (int32_t i = 1; i < max_steps && !reply_->done() && !(until_text && reply_->has_text()); ++i) {
                if (reply_cancel_.load() || cancel_.closing.load()) {
                    break;  // the steps done stay; the caller sees the cancel
                }
                const llama_token token = lone_step_locked();
                acc.token = token >= 0 ? token : acc.token;
            }
            report_locked(acc);
            return acc;
        },
        false);
}

void Session::step_slots_locked(const std::vector<std::shared_ptr<Session>> & sessions, SharedContext & shared,
                                llama_batch_ext * batch, std::vector<GenerationStep> & acc) {
    const size_t n = sessions.size();
    for (const auto & s : sessions) {
        if (s->reply_ && s->reply_->done()) {
            continue;
        }
        s->check_reply_locked();  // before anything changes
    }
    std::vector<StepSlot> slots(n);
    std::vector<StepSlot *> live;
    std::vector<Reply::Saved> saved(n);
    for (size_t i = 0; i < n; ++i) {
        Session & s = *sessions[i];
        if (s.reply_->done()) {
            continue;
        }
        if (s.registry_->n_cells() >= s.params_.n_ctx) {
            s.reply_->end("length");  // no free KV cell: this slot ends without taking part
            continue;
        }
        saved[i] = s.reply_->save();
        slots[i].seq = s.seq_;
        slots[i].reply = s.reply_.get();
        slots[i].logits = s.registry_->logits().data();
        slots[i].pos = s.registry_->next_generated_pos();
        slots[i].keep_last = true;  // the timeline keeps every token its reply accepted
        live.push_back(&slots[i]);
    }
    Session & first = *sessions.front();
    std::vector<llama_token> tokens(n, -1);
    std::vector<llama_pos> pos0(n, 0);
    const auto put_back = [&] {
        for (size_t i = 0; i < n; ++i) {
            if (slots[i].reply != nullptr) {
                sessions[i]->reply_->restore(std::move(saved[i]));
            }
        }
    };
    llama_context * ctx = shared.ctx.get();
    StepDecode decoded;
    try {
        draw_slots(*first.model_, live);
        for (size_t i = 0; i < n; ++i) {
            tokens[i] = slots[i].token;
            pos0[i] = slots[i].pos;
        }
        decoded = decode_slots(ctx, batch, live, INT32_MAX, [&](llama_batch_ext * b) {
            return decode_status([&] {
                switch (take_decode_fault()) {  // the test-only fault hook (decode.h)
                    case DecodeFault::Status: return -3;
                    case DecodeFault::Exception: throw std::bad_alloc();
                    case DecodeFault::Close:
                        for (const auto & s : sessions) {
                            s->cancel_.closing.store(true);
                        }
                        break;
                    case DecodeFault::Pause: pause_decode(); break;
                    default: break;  // a cancel() does not stop a step shared with other slots
                }
                return llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, b);
            });
        });
    } catch (...) {
        put_back();
        throw;
    }
    int32_t status = decoded.status;
    for (const StepSlot * s : live) {
        if (status == 0 && s->bad_logits) {
            status = kDecodeNonFinite;
        }
    }
    if (status != 0) {
        // Each token went one cell past its timeline: dropping those cells puts every KV cache back.
        for (size_t i = 0; i < n; ++i) {
            if (slots[i].out >= 0 && shared.ctx) {
                llama_memory_seq_rm(llama_get_memory(ctx), sessions[i]->seq_, pos0[i], -1);
            }
        }
        put_back();
        if (status == 2) {
            throw CancelledError("a slot was closed during the batched step; every slot is as it was");
        }
        throw Error(status == kDecodeNonFinite ? std::string(kNonFiniteLogits)
                                               : "the batched step failed (status " + std::to_string(status) +
                                                     "); every slot is as it was before the call");
    }
    for (size_t i = 0; i < n; ++i) {
        Session & s = *sessions[i];
        if (slots[i].out >= 0) {
            s.registry_->accept_generated(tokens[i], slots[i].piece, slots[i].logits);
            s.stats_.batched_steps += 1;
            s.stats_.tokens_generated += 1;
            acc[i].token = tokens[i];
        }
    }
}

std::vector<GenerationStep> Session::step_together(const std::vector<std::shared_ptr<Session>> & sessions) {
    return step_until(sessions, 1, {}, nullptr);
}

std::vector<GenerationStep> Session::step_until(const std::vector<std::shared_ptr<Session>> & sessions,
                                                int32_t max_steps, const std::vector<bool> & streams,
                                                const std::atomic<bool> * interrupt) {
    if (sessions.empty()) {
        return {};
    }
    if (max_steps < 1) {
        throw std::invalid_argument("max_steps must be >= 1, got " + std::to_string(max_steps));
    }
    if (!streams.empty() && streams.size() != sessions.size()) {
        throw std::invalid_argument("step_until: streams must name every session or none");
    }
    Session & first = *sessions.front();
    std::set<llama_seq_id> seen;
    for (const auto & s : sessions) {
        if (!s) {
            throw std::invalid_argument("step_together: a session is None");
        }
        if (s->shared_ != first.shared_) {
            throw std::invalid_argument("step_together: every session must be a slot of the same pool");
        }
        if (!seen.insert(s->seq_).second) {
            throw std::invalid_argument("step_together: slot " + std::to_string(s->seq_) + " is listed twice");
        }
    }
    auto hold = first.model_->hold();
    SharedContext & shared = *first.shared_;
    std::lock_guard<std::mutex> lock(shared.mutex);
    std::vector<const CancelState *> states;
    for (const auto & s : sessions) {
        s->check_open();
        s->cancel_.cancel.store(false);
        states.push_back(&s->cancel_);
    }
    SharedContext::Call call(shared, states, true);
    const size_t n = sessions.size();
    std::vector<GenerationStep> acc(n);
    std::vector<bool> was_done(n);
    for (size_t i = 0; i < n; ++i) {
        was_done[i] = sessions[i]->reply_ && sessions[i]->reply_->done();
    }
    llama_batch_ext_ptr batch(llama_batch_ext_init(shared.ctx.get()));  // one for every step of the call
    // A failed step is undone and raised at once; the steps before it stay, and their text, tokens
    // and log-probabilities come with the next call (they wait in each reply).
    for (int32_t step = 0; step < max_steps; ++step) {
        if (step > 0) {
            bool stop = interrupt != nullptr && interrupt->load();
            for (size_t i = 0; i < n && !stop; ++i) {
                const Reply * r = sessions[i]->reply_.get();
                stop = (r->done() && !was_done[i]) || (!streams.empty() && streams[i] && r->has_text()) ||
                       sessions[i]->cancel_.closing.load();
            }
            if (stop) {
                break;
            }
        }
        step_slots_locked(sessions, shared, batch.get(), acc);
        bool all_done = true;
        for (const auto & s : sessions) {
            all_done = all_done && s->reply_->done();
        }
        if (all_done) {
            break;
        }
    }
    for (size_t i = 0; i < n; ++i) {
        sessions[i]->report_locked(acc[i]);
    }
    return acc;
}

std::vector<Branch> Session::generate_branches(int32_t n, const SamplingParams & params, int32_t max_tokens,
                                               const std::vector<std::string> & stops) {
    if (n < 1 || n > kMaxBranches) {
        throw std::invalid_argument("n must be in [1, " + std::to_string(kMaxBranches) + "], got " + std::to_string(n));
    }
    if (shared_->n_seq != 1) {
        throw std::invalid_argument("n > 1 needs a session with a context of its own (model.session()), not a "
                                    "pool slot");
    }
    if (n > params_.n_batch) {
        throw std::invalid_argument("n (" + std::to_string(n) + ") must be <= n_batch (" +
                                    std::to_string(params_.n_batch) + "): each step decodes one token per reply");
    }
    StopStrings checked(stops);  // throws for an empty stop string
    return run_edit([&] {
        check_has_logits_locked();
        llama_context * c = ctx();
        llama_memory_t mem = llama_get_memory(c);
        const int32_t budget = (params_.n_ctx - registry_->n_cells()) / n;
        const size_t count = static_cast<size_t>(n);
        std::vector<std::unique_ptr<Reply>> replies;
        std::vector<StepSlot> slots(count);
        std::vector<StepSlot *> live;
        // The branch sequences share the session's cells until they are dropped, whatever happens.
        struct Drop {
            llama_memory_t mem;
            int32_t n;
            ~Drop() {
                for (int32_t i = 0; i < n; ++i) {
                    llama_memory_seq_rm(mem, kFirstBranchSeq + i, -1, -1);
                }
            }
        } drop{mem, n};
        const llama_pos pos0 = registry_->next_generated_pos();
        for (size_t i = 0; i < count; ++i) {
            const llama_seq_id seq = kFirstBranchSeq + static_cast<llama_seq_id>(i);
            llama_memory_seq_rm(mem, seq, -1, -1);
            llama_memory_seq_cp(mem, seq_, seq, -1, -1);
            ReplyParams p;
            p.sampling = params;
            p.sampling.seed = params.seed + static_cast<uint32_t>(i);
            p.max_tokens = std::min(max_tokens, std::max(budget, 0));
            p.stops = stops;
            replies.push_back(std::make_unique<Reply>(*model_, p));
            slots[i].seq = seq;
            slots[i].reply = replies.back().get();
            slots[i].logits = registry_->logits().data();
            slots[i].pos = pos0;
            live.push_back(&slots[i]);
        }
        llama_batch_ext_ptr batch(llama_batch_ext_init(c));
        for (;;) {
            draw_slots(*model_, live);
            const StepDecode d = decode_slots(c, batch.get(), live, INT32_MAX, [&](llama_batch_ext * b) {
                return decode_status([&] { return llama_process(c, LLAMA_PROCESS_TYPE_DECODE, b); });
            });
            if (d.n_tokens == 0) {
                break;  // every reply has ended
            }
            if (d.status == 2) {
                throw CancelledError("generation was cancelled; the session is as it was");
            }
            if (d.status != 0) {
                throw Error("decoding the replies failed (status " + std::to_string(d.status) +
                            "); the session is as it was");
            }
            for (const StepSlot & s : slots) {
                if (s.bad_logits) {
                    throw Error(kNonFiniteLogits);
                }
            }
        }
        std::vector<Branch> out(count);
        for (size_t i = 0; i < count; ++i) {
            const Reply & r = *replies[i];
            out[i].text = r.text();
            out[i].n_tokens = r.n_tokens();
            out[i].finish_reason = r.finish_reason();
            out[i].error = r.error();
            stats_.tokens_generated += static_cast<uint64_t>(r.n_tokens());
        }
        return out;
    });
}

std::string Session::flush_generation() {
    std::lock_guard<std::mutex> lock(shared_->mutex);
    std::string out;
    if (reply_) {
        reply_->end("stop");
        out = reply_->take_text();
        reply_.reset();
    }
    return out;
}

std::string Session::detokenize(const std::vector<llama_token> & tokens) const {
    auto hold = model_->hold();
    std::string out;
    for (const std::string & piece : model_->pieces_of(tokens)) {
        out += piece;
    }
    return out;
}

}  // namespace llava_kv
