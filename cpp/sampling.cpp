#include "sampling.h"

#include <stdexcept>

#include "errors.h"

namespace llava_kv {

llama_sampler_ptr make_sampler_chain(const SamplingParams & p, int32_t n_vocab) {
    if (p.temperature > 0 && (p.top_p <= 0 || p.top_p > 1 || p.min_p < 0 || p.min_p > 1)) {
        throw std::invalid_argument("top_p must be in (0, 1] and min_p in [0, 1]");
    }
    if (p.repeat_penalty <= 0) {
        throw std::invalid_argument("repeat_penalty must be > 0 (1.0 disables it)");
    }
    llama_sampler_chain_params cparams = llama_sampler_chain_default_params();
    cparams.no_perf = true;
    llama_sampler_ptr chain(llama_sampler_chain_init(cparams));
    if (p.repeat_penalty != 1.0f) {
        llama_sampler_chain_add(chain.get(), llama_sampler_init_penalties(n_vocab, p.repeat_last_n,
                                                                          p.repeat_penalty, 0.0f, 0.0f));
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

}  // namespace llava_kv
