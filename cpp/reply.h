// One reply being generated on one sequence: its sampler chain, its text (cut at a stop string,
// shown as whole characters), its token limit, the log-probabilities asked for, and how it ended.
// Every generation path draws and accepts its tokens through it: a lone session, a pool's slots,
// generate_branches() and the batch runner (slot_step.h decodes them).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "llama-cpp.h"
#include "model.h"
#include "sampling.h"
#include "stop_strings.h"

namespace llava_kv {

constexpr int32_t kMaxTopLogprobs = 20;  // as OpenAI's API

struct ReplyParams {
    SamplingParams sampling;
    int32_t max_tokens = 64;  // 0: the reply ends ("length") before its first token
    std::vector<std::string> stops;
    int32_t top_logprobs = -1;  // -1: no log-probabilities; 0..20: each token's, with that many alternatives
};

// A token's log-probability under the model (the log-softmax of the logits it was drawn from,
// before the samplers) and the likeliest tokens at its place (likeliest first, ties by id).
struct TokenLogprob {
    llama_token token = -1;
    double logprob = 0;
    std::vector<std::pair<llama_token, double>> top;
};

class Reply {
  public:
    // Throws std::invalid_argument for settings the sampler chain refuses (sampling.h), an empty
    // stop string, max_tokens < 0 or top_logprobs outside [-1, 20].
    Reply(const Model & model, const ReplyParams & params);

    // Draws the next token from `logits`: the token to decode, or -1 when the reply ends here (an
    // end-of-generation token, reported and never decoded: "stop"; a grammar that allows no token:
    // "error"). Nothing is accepted yet.
    llama_token draw(const float * logits);
    // The token draw() returned joins the reply: its sampler history, its text, its count; the
    // reply ends if that completes a stop string ("stop") or reaches max_tokens ("length").
    void accept(llama_token token, const std::string & piece);
    // Ends the reply now (a full slot: "length"); no-op once ended.
    void end(const std::string & reason);

    bool done() const { return !state_.finish_reason.empty(); }
    // The reply ended on an end-of-generation token (drawn, not accepted).
    bool ended_on_eog() const { return state_.eog; }
    const std::string & finish_reason() const { return state_.finish_reason; }
    const std::string & error() const { return state_.error; }
    int32_t n_tokens() const { return state_.n_tokens; }
    // Every byte generated, cut before a stop string (may end inside a character).
    const std::string & text() const { return state_.stops.text(); }
    // The bytes that became final since the last call: whole characters that cannot be the start
    // of a stop string still to come; everything left once the reply has ended.
    std::string take_text();
    // Whether take_text() would return something now.
    bool has_text() const;
    // The log-probability entries of the tokens accepted since the last call.
    std::vector<TokenLogprob> take_logprobs();
    // Tokens accepted since the last call.
    int32_t take_n_tokens();

    // Everything draw() and accept() change, so that a step that fails can put the reply back.
    struct Saved;
    Saved save() const;
    void restore(Saved && saved);

  private:
    struct State {
        StopStrings stops;
        size_t sent = 0;          // bytes of the text taken
        int32_t n_tokens = 0;
        int32_t n_reported = 0;   // tokens counted by take_n_tokens()
        std::string finish_reason;
        std::string error;
        bool eog = false;
        std::vector<TokenLogprob> logprobs;  // not yet taken
        TokenLogprob drawn;  // the last draw's entry, until accept()
    };

    const Model * model_;
    int32_t max_tokens_;
    int32_t top_logprobs_;
    llama_sampler_ptr sampler_;
    State state_;

  public:
    // What save() keeps: the sampler chain's copy and the few counters a step moves, not the text.
    struct Saved {
        llama_sampler_ptr sampler;
        StopStrings::Mark text;
        size_t sent = 0;
        int32_t n_tokens = 0;
        int32_t n_reported = 0;
        std::string finish_reason;
        std::string error;
        bool eog = false;
        size_t n_logprobs = 0;
    };
};

}  // namespace llava_kv
