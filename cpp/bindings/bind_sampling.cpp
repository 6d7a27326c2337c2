// Sampling settings (one class for sessions, pools and the batch runner) and constrained output:
// GBNF grammars are taken as they are, JSON schemas become one through llama.cpp's converter.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "json_schema_grammar.h"
#include "sampling.h"

namespace py = pybind11;

namespace llava_kv::bindings {

void register_sampling(py::module_ & m) {
    py::class_<SamplingParams>(m, "SamplingParams",
                               "How the next token is drawn: llama.cpp's sampler chain (penalties, logit bias, "
                               "grammar, then greedy or top-k/top-p/min-p/temperature). The facade checks "
                               "ranges; the core checks again when a generation starts.")
        .def(py::init([](float temperature, int32_t top_k, float top_p, float min_p, float repeat_penalty,
                         int32_t repeat_last_n, float presence_penalty, float frequency_penalty,
                         std::vector<std::pair<llama_token, float>> logit_bias, std::string grammar, uint32_t seed) {
                 SamplingParams p;
                 p.temperature = temperature;
                 p.top_k = top_k;
                 p.top_p = top_p;
                 p.min_p = min_p;
                 p.repeat_penalty = repeat_penalty;
                 p.repeat_last_n = repeat_last_n;
                 p.presence_penalty = presence_penalty;
                 p.frequency_penalty = frequency_penalty;
                 p.logit_bias = std::move(logit_bias);
                 p.grammar = std::move(grammar);
                 p.seed = seed;
                 return p;
             }),
             py::kw_only(), py::arg("temperature") = 0.0f, py::arg("top_k") = 40, py::arg("top_p") = 0.95f,
             py::arg("min_p") = 0.05f, py::arg("repeat_penalty") = 1.0f, py::arg("repeat_last_n") = 64,
             py::arg("presence_penalty") = 0.0f, py::arg("frequency_penalty") = 0.0f,
             py::arg("logit_bias") = std::vector<std::pair<llama_token, float>>{}, py::arg("grammar") = "",
             py::arg("seed") = 0, "Settings for one generation (greedy at temperature 0).")
        .def_readwrite("temperature", &SamplingParams::temperature, "<= 0: greedy")
        .def_readwrite("top_k", &SamplingParams::top_k, "0: off")
        .def_readwrite("top_p", &SamplingParams::top_p, "nucleus mass kept, (0, 1]")
        .def_readwrite("min_p", &SamplingParams::min_p, "tokens below min_p x the likeliest's probability are dropped")
        .def_readwrite("repeat_penalty", &SamplingParams::repeat_penalty, "1.0: off")
        .def_readwrite("repeat_last_n", &SamplingParams::repeat_last_n, "tokens the penalties look back over")
        .def_readwrite("presence_penalty", &SamplingParams::presence_penalty,
                       "subtracted once from each token already generated (OpenAI's)")
        .def_readwrite("frequency_penalty", &SamplingParams::frequency_penalty,
                       "subtracted per earlier occurrence (OpenAI's)")
        .def_readwrite("logit_bias", &SamplingParams::logit_bias, "(token id, bias) pairs added to the logits")
        .def_readwrite("grammar", &SamplingParams::grammar, "GBNF with a 'root' rule; '' for none")
        .def_readwrite("seed", &SamplingParams::seed, "the draw's random seed");

    m.def("json_schema_grammar", released(&json_schema_grammar), py::arg("schema_json"),
          "The GBNF grammar (llama.cpp's converter) for a JSON Schema given as JSON text. ValueError for text "
          "that is not JSON, a schema the converter rejects, or a pattern it could only express loosely.");
}

}  // namespace llava_kv::bindings
