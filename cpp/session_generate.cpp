// Session's generation: sampling one token at a time, and the batched step of a pool's slots.
#include <new>
#include <set>

#include "errors.h"
#include "llama-ext.h"
#include "sampling.h"
#include "session.h"
#include "stop_strings.h"
#include "tokens.h"

namespace llava_kv {

void Session::begin_generation(const SamplingParams & p) {
    auto hold = model_->hold();
    std::lock_guard<std::mutex> lock(shared_->mutex);
    check_open();
    sampler_ = make_sampler_chain(p, *model_);
    pending_utf8_.clear();
}

void Session::check_has_logits_locked() const {
    if (!registry_->has_logits()) {
        throw Error(registry_->timeline().empty()
                        ? "nothing to generate from: the session is empty"
                        : "nothing to generate from: the timeline ends with image tokens; append text first");
    }
}

GenerationStep Session::sample_locked() {
    if (!sampler_) {
        throw Error("generate_step() before begin_generation()");
    }
    check_has_logits_locked();
    const std::vector<float> & logits = registry_->logits();
    GenerationStep step;
    step.token = draw_token(sampler_.get(), logits.data(), static_cast<int32_t>(logits.size()));
    step.end_of_generation = llama_vocab_is_eog(model_->vocab(), step.token);
    return step;
}

void Session::accept_locked(GenerationStep & step, const float * logits) {
    const std::string piece = token_piece(model_->vocab(), step.token);
    if (logits) {
        registry_->accept_generated(step.token, piece, logits);
        stats_.batched_steps += 1;
    } else {
        registry_->append_generated(step.token, piece);
    }
    llama_sampler_accept(sampler_.get(), step.token);
    stats_.tokens_generated += 1;
    pending_utf8_ += piece;
    const size_t n = complete_utf8_prefix(pending_utf8_);
    step.text = pending_utf8_.substr(0, n);
    pending_utf8_.erase(0, n);
}

GenerationStep Session::generate_step() {
    return run_edit([&] {
        GenerationStep step = sample_locked();
        if (!step.end_of_generation) {
            accept_locked(step, nullptr);
        }
        return step;
    });
}

std::vector<GenerationStep> Session::step_together(const std::vector<std::shared_ptr<Session>> & sessions) {
    if (sessions.empty()) {
        return {};
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

    // Sample every slot first; nothing has changed yet, so a failure here leaves all as they were.
    // The sampler chains are copied first so that a failed decode can put them back (the random
    // number generator advances as a token is drawn).
    const size_t n = sessions.size();
    std::vector<GenerationStep> steps(n);
    std::vector<llama_sampler_ptr> saved(n);
    std::vector<llama_pos> pos(n, 0);
    const auto put_back_samplers = [&] {
        for (size_t i = 0; i < n; ++i) {
            if (saved[i]) {
                sessions[i]->sampler_ = std::move(saved[i]);
            }
        }
    };
    for (size_t i = 0; i < n; ++i) {
        Session & s = *sessions[i];
        if (s.sampler_) {
            saved[i].reset(llama_sampler_clone(s.sampler_.get()));
        }
        try {
            steps[i] = s.sample_locked();
        } catch (const GrammarError & e) {
            steps[i].error = e.what();  // this slot ends alone; the others go on
            continue;
        } catch (...) {
            put_back_samplers();
            throw;
        }
        if (!steps[i].end_of_generation) {
            pos[i] = s.registry_->next_generated_pos();
        }
    }
    llama_context * ctx = shared.ctx.get();
    llama_batch_ext_ptr batch(llama_batch_ext_init(ctx));
    std::vector<int32_t> out_index(n, -1);
    for (size_t i = 0; i < n; ++i) {
        if (steps[i].end_of_generation || !steps[i].error.empty()) {
            continue;
        }
        const int32_t idx = llama_batch_ext_add_token(batch.get(), sessions[i]->seq_, steps[i].token);
        if (idx < 0) {
            put_back_samplers();
            throw Error("could not build the batched step (more slots than the batch holds?)");
        }
        llama_batch_ext_set_pos(batch.get(), idx, &pos[i]);
        llama_batch_ext_set_output_logits(batch.get(), idx, true);
        out_index[i] = idx;
    }
    int32_t status = 0;
    size_t n_tokens = 0;
    for (int32_t idx : out_index) {
        n_tokens += idx >= 0 ? 1 : 0;
    }
    if (n_tokens > 0) {
        status = decode_status([&] {
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
            return llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch.get());
        });
        std::vector<const float *> logits(n, nullptr);
        if (status == 0) {
            const size_t n_vocab = static_cast<size_t>(first.model_->n_vocab());
            for (size_t i = 0; i < n; ++i) {
                if (out_index[i] < 0) {
                    continue;
                }
                logits[i] = llama_get_logits_ith(ctx, out_index[i]);
                if (logits[i] == nullptr) {
                    status = -1;
                } else if (!all_finite(logits[i], n_vocab)) {
                    status = kDecodeNonFinite;
                }
            }
        }
        if (status != 0) {
            // Each token went one cell past its timeline: dropping those cells puts every KV cache back.
            for (size_t i = 0; i < n; ++i) {
                if (out_index[i] >= 0 && shared.ctx) {
                    llama_memory_seq_rm(llama_get_memory(ctx), sessions[i]->seq_, pos[i], -1);
                }
            }
            put_back_samplers();
            if (status == 2) {
                throw CancelledError("a slot was closed during the batched step; every slot is as it was");
            }
            throw Error(status == kDecodeNonFinite ? std::string(kNonFiniteLogits)
                                                   : "the batched step failed (status " + std::to_string(status) +
                                                         "); every slot is as it was before the call");
        }
        for (size_t i = 0; i < n; ++i) {
            if (out_index[i] >= 0) {
                sessions[i]->accept_locked(steps[i], logits[i]);
            }
        }
    }
    return steps;
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
        const int32_t n_vocab = model_->n_vocab();
        const int32_t budget = (params_.n_ctx - registry_->n_cells()) / n;
        const int32_t limit = std::min(max_tokens, std::max(budget, 0));
        struct Live {
            llama_sampler_ptr sampler;
            StopStrings text;
            const float * logits;
            int32_t index = -1;
        };
        std::vector<Live> live;
        std::vector<Branch> out(static_cast<size_t>(n));
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
        for (int32_t i = 0; i < n; ++i) {
            llama_memory_seq_rm(mem, kFirstBranchSeq + i, -1, -1);
            llama_memory_seq_cp(mem, seq_, kFirstBranchSeq + i, -1, -1);
            SamplingParams p = params;
            p.seed = params.seed + static_cast<uint32_t>(i);
            live.push_back({make_sampler_chain(p, *model_), StopStrings(stops), registry_->logits().data()});
        }
        std::vector<bool> running(static_cast<size_t>(n), true);
        const llama_pos pos0 = registry_->next_generated_pos();
        llama_batch_ext_ptr batch(llama_batch_ext_init(c));
        for (int32_t step = 0;; ++step) {
            llama_batch_ext_clear(batch.get());
            bool any = false;
            for (int32_t i = 0; i < n; ++i) {
                Branch & b = out[static_cast<size_t>(i)];
                Live & l = live[static_cast<size_t>(i)];
                if (!running[static_cast<size_t>(i)]) {
                    continue;
                }
                if (step >= limit) {
                    b.finish_reason = "length";
                    running[static_cast<size_t>(i)] = false;
                    continue;
                }
                llama_token token = -1;
                try {
                    token = draw_token(l.sampler.get(), l.logits, n_vocab);
                } catch (const GrammarError & e) {
                    b.finish_reason = "error";
                    b.error = e.what();
                    running[static_cast<size_t>(i)] = false;
                    continue;
                }
                if (llama_vocab_is_eog(model_->vocab(), token)) {
                    b.finish_reason = "stop";
                    running[static_cast<size_t>(i)] = false;
                    continue;
                }
                llama_sampler_accept(l.sampler.get(), token);
                b.n_tokens += 1;
                stats_.tokens_generated += 1;
                if (l.text.feed(token_piece(model_->vocab(), token))) {
                    b.finish_reason = "stop";
                    running[static_cast<size_t>(i)] = false;
                    continue;
                }
                const llama_pos pos = pos0 + step;
                l.index = llama_batch_ext_add_token(batch.get(), kFirstBranchSeq + i, token);
                if (l.index < 0) {
                    throw Error("could not build the batched step of the replies");
                }
                llama_batch_ext_set_pos(batch.get(), l.index, &pos);
                llama_batch_ext_set_output_logits(batch.get(), l.index, true);
                any = true;
            }
            if (!any) {
                break;
            }
            const int32_t status = decode_status([&] { return llama_process(c, LLAMA_PROCESS_TYPE_DECODE, batch.get()); });
            if (status == 2) {
                throw CancelledError("generation was cancelled; the session is as it was");
            }
            if (status != 0) {
                throw Error("decoding the replies failed (status " + std::to_string(status) +
                            "); the session is as it was");
            }
            for (int32_t i = 0; i < n; ++i) {
                Live & l = live[static_cast<size_t>(i)];
                if (running[static_cast<size_t>(i)]) {
                    l.logits = llama_get_logits_ith(c, l.index);
                    if (l.logits == nullptr || !all_finite(l.logits, static_cast<size_t>(n_vocab))) {
                        throw Error(kNonFiniteLogits);
                    }
                }
            }
        }
        for (int32_t i = 0; i < n; ++i) {
            out[static_cast<size_t>(i)].text = live[static_cast<size_t>(i)].text.text();
        }
        return out;
    });
}

std::string Session::flush_generation() {
    std::lock_guard<std::mutex> lock(shared_->mutex);
    std::string out;
    out.swap(pending_utf8_);
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
