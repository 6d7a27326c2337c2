#include "sampling.h"

#include <cmath>
#include <stdexcept>

#include "errors.h"
#include "runtime.h"
#include "utf8_sampler.h"

namespace llava_kv {

llama_sampler_ptr make_sampler_chain(const SamplingParams & p, const Model & model) {
    const llama_vocab * vocab = model.vocab();
    if (p.temperature > 0 && (p.top_p <= 0 || p.top_p > 1 || p.min_p < 0 || p.min_p > 1)) {
        throw std::invalid_argument("top_p must be in (0, 1] and min_p in [0, 1]");
    }
    if (p.repeat_penalty <= 0) {
        throw std::invalid_argument("repeat_penalty must be > 0 (1.0 disables it)");
    }
    if (!std::isfinite(p.presence_penalty) || !std::isfinite(p.frequency_penalty)) {
        throw std::invalid_argument("presence_penalty and frequency_penalty must be finite");
    }
    const int32_t n_vocab = llama_vocab_n_tokens(vocab);
    std::vector<llama_logit_bias> bias;
    for (const auto & [token, value] : p.logit_bias) {
        if (token < 0 || token >= n_vocab) {
            throw std::invalid_argument("logit_bias: token id " + std::to_string(token) +
                                        " is outside the vocabulary (0.." + std::to_string(n_vocab - 1) + ")");
        }
        if (std::isnan(value)) {
            throw std::invalid_argument("logit_bias: the bias of token " + std::to_string(token) + " is NaN");
        }
        bias.push_back({token, value});
    }
    llama_sampler_chain_params cparams = llama_sampler_chain_default_params();
    cparams.no_perf = true;
    llama_sampler_ptr chain(llama_sampler_chain_init(cparams));
    if (p.repeat_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f) {
        llama_sampler_chain_add(chain.get(), llama_sampler_init_penalties(n_vocab, p.repeat_last_n, p.repeat_penalty,
                                                                          p.frequency_penalty, p.presence_penalty));
    }
    if (!bias.empty()) {
        llama_sampler_chain_add(chain.get(),
                                llama_sampler_init_logit_bias(n_vocab, static_cast<int32_t>(bias.size()), bias.data()));
    }
    if (!p.grammar.empty()) {
        take_logged_errors();
        llama_sampler * grammar = llama_sampler_init_grammar(vocab, p.grammar.c_str(), "root");
        if (grammar == nullptr) {
            std::string why = take_logged_errors();
            while (!why.empty() && (why.back() == '\n' || why.back() == ' ')) {
                why.pop_back();
            }
            throw std::invalid_argument("grammar: not a GBNF grammar llama.cpp can use (a rule named 'root' is "
                                        "the start)" + (why.empty() ? std::string() : ": " + why));
        }
        llama_sampler_chain_add(chain.get(), grammar);
        llama_sampler_chain_add(chain.get(), make_utf8_sampler(vocab, &model.token_pieces()));
    }
    if (p.temperature <= 0) {
        llama_sampler_chain_add(chain.get(), llama_sampler_init_greedy());
    } else {
        if (p.top_k > 0) {
            llama_sampler_chain_add(chain.get(), llama_sampler_init_top_k(p.top_k));
        }
        llama_sampler_chain_add(chain.get(), llama_sampler_init_top_p(p.top_p, 1));
        llama_sampler_chain_add(chain.get(), llama_sampler_init_min_p(p.min_p, 1));
        llama_sampler_chain_add(chain.get(), llama_sampler_init_temp(p.temperature));
        llama_sampler_chain_add(chain.get(), llama_sampler_init_dist(p.seed));
    }
    return chain;
}

llama_token draw_token(llama_sampler * chain, const float * logits, int32_t n_vocab) {
    std::vector<llama_token_data> candidates(static_cast<size_t>(n_vocab));
    for (int32_t i = 0; i < n_vocab; ++i) {
        candidates[static_cast<size_t>(i)] = {i, logits[i], 0.0f};
    }
    llama_token_data_array array{candidates.data(), candidates.size(), -1, false};
    llama_sampler_apply(chain, &array);
    if (array.selected < 0 || static_cast<size_t>(array.selected) >= array.size) {
        throw Error("the sampler selected no token");
    }
    // Only a grammar masks every candidate (logit -inf): then nothing it allows can follow.
    if (std::isinf(array.data[array.selected].logit) && array.data[array.selected].logit < 0) {
        throw GrammarError("the grammar allows no token at this point: no token of the vocabulary continues it");
    }
    return array.data[array.selected].id;
}

}  // namespace llava_kv
