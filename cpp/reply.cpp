#include "reply.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "errors.h"

namespace llava_kv {

namespace {

// The log-softmax of `logits` at `token`, and the `top` likeliest tokens (ties by id), in double.
TokenLogprob logprob_entry(const float * logits, int32_t n_vocab, llama_token token, int32_t top) {
    double max = logits[0];
    for (int32_t i = 1; i < n_vocab; ++i) {
        max = std::max(max, static_cast<double>(logits[i]));
    }
    double sum = 0;
    for (int32_t i = 0; i < n_vocab; ++i) {
        sum += std::exp(static_cast<double>(logits[i]) - max);
    }
    const double log_z = max + std::log(sum);
    TokenLogprob entry;
    entry.token = token;
    entry.logprob = static_cast<double>(logits[token]) - log_z;
    if (top > 0) {
        std::vector<llama_token> ids(static_cast<size_t>(n_vocab));
        for (int32_t i = 0; i < n_vocab; ++i) {
            ids[static_cast<size_t>(i)] = i;
        }
        const auto likelier = [&](llama_token a, llama_token b) {
            return logits[a] != logits[b] ? logits[a] > logits[b] : a < b;
        };
        const size_t k = std::min<size_t>(static_cast<size_t>(top), ids.size());
        std::partial_sort(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(k), ids.end(), likelier);
        for (size_t i = 0; i < k; ++i) {
            entry.top.emplace_back(ids[i], static_cast<double>(logits[ids[i]]) - log_z);
        }
    }
    return entry;
}

}  // namespace

Reply::Reply(const Model & model, const ReplyParams & params)
    : model_(&model),
      max_tokens_(params.max_tokens),
      top_logprobs_(params.top_logprobs),
      state_{StopStrings(params.stops)} {
    if (params.max_tokens < 0) {
        throw std::invalid_argument("max_tokens must be >= 0, got " + std::to_string(params.max_tokens));
    }
    if (params.top_logprobs < -1 || params.top_logprobs > kMaxTopLogprobs) {
        throw std::invalid_argument("logprobs must be in [0, " + std::to_string(kMaxTopLogprobs) + "], got " +
                                    std::to_string(params.top_logprobs));
    }
    sampler_ = make_sampler_chain(params.sampling, model);
    if (max_tokens_ == 0) {
        state_.finish_reason = "length";
    }
}

llama_token Reply::draw(const float * logits) {
    if (done()) {
        return -1;
    }
    const int32_t n_vocab = model_->n_vocab();
    llama_token token = -1;
    try {
        token = draw_token(sampler_.get(), logits, n_vocab);
    } catch (const GrammarError & e) {
        state_.finish_reason = "error";
        state_.error = e.what();
        return -1;
    }
    if (llama_vocab_is_eog(model_->vocab(), token)) {
        state_.finish_reason = "stop";
        state_.eog = true;
        return -1;
    }
    if (top_logprobs_ >= 0) {
        state_.drawn = logprob_entry(logits, n_vocab, token, top_logprobs_);
    }
    return token;
}

void Reply::accept(llama_token token, const std::string & piece) {
    llama_sampler_accept(sampler_.get(), token);
    state_.n_tokens += 1;
    if (top_logprobs_ >= 0) {
        state_.logprobs.push_back(std::move(state_.drawn));
        state_.drawn = {};
    }
    if (state_.stops.feed(piece)) {
        state_.finish_reason = "stop";
    } else if (state_.n_tokens >= max_tokens_) {
        state_.finish_reason = "length";
    }
}

void Reply::end(const std::string & reason) {
    if (!done()) {
        state_.finish_reason = reason;
    }
}

std::string Reply::take_text() {
    const std::string & all = state_.stops.text();
    const size_t upto = done() ? all.size() : state_.stops.safe_size();
    if (upto <= state_.sent) {
        return {};
    }
    std::string out = all.substr(state_.sent, upto - state_.sent);
    state_.sent = upto;
    return out;
}

std::vector<TokenLogprob> Reply::take_logprobs() {
    std::vector<TokenLogprob> out;
    out.swap(state_.logprobs);
    return out;
}

bool Reply::has_text() const {
    return (done() ? state_.stops.text().size() : state_.stops.safe_size()) > state_.sent;
}

int32_t Reply::take_n_tokens() {
    const int32_t n = state_.n_tokens - state_.n_reported;
    state_.n_reported = state_.n_tokens;
    return n;
}

Reply::Saved Reply::save() const {
    return Saved{llama_sampler_ptr(llama_sampler_clone(sampler_.get())), state_.stops.mark(), state_.sent,
                 state_.n_tokens, state_.n_reported, state_.finish_reason, state_.error, state_.eog,
                 state_.logprobs.size()};
}

void Reply::restore(Saved && saved) {
    sampler_ = std::move(saved.sampler);
    state_.stops.rewind(saved.text);
    state_.sent = saved.sent;
    state_.n_tokens = saved.n_tokens;
    state_.n_reported = saved.n_reported;
    state_.finish_reason = std::move(saved.finish_reason);
    state_.error = std::move(saved.error);
    state_.eog = saved.eog;
    state_.logprobs.resize(saved.n_logprobs);
    state_.drawn = {};
}

}  // namespace llava_kv
