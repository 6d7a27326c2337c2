#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <utility>

#include "bindings.h"
#include "errors.h"
#include "image_encoder.h"
#include "model.h"
#include "sampling.h"
#include "session.h"

namespace py = pybind11;

namespace llava_kv::bindings {
namespace {

SessionParams session_params(int32_t n_ctx, int32_t n_batch, int32_t n_ubatch, uint32_t seed, int32_t n_threads) {
    SessionParams params;
    params.n_ctx = n_ctx;
    params.n_batch = n_batch;
    params.n_ubatch = n_ubatch;
    params.seed = seed;
    params.n_threads = n_threads;
    return params;
}

}  // namespace

void register_model(py::module_ & m) {
    py::enum_<llama_flash_attn_type>(m, "FlashAttn", "llama.cpp's flash attention choice for a model's contexts.")
        .value("AUTO", LLAMA_FLASH_ATTN_TYPE_AUTO, "llama.cpp decides (on where the device supports it)")
        .value("ON", LLAMA_FLASH_ATTN_TYPE_ENABLED, "always")
        .value("OFF", LLAMA_FLASH_ATTN_TYPE_DISABLED, "never (a quantized KV cache then cannot be used)");
    py::enum_<ggml_type>(m, "KvType", "The element type of a KV cache: the types llava-kv offers.")
        .value("F16", GGML_TYPE_F16, "16-bit floats, as llama.cpp defaults")
        .value("Q8_0", GGML_TYPE_Q8_0, "8-bit blocks of 32: about half the memory (needs flash attention)")
        .value("Q4_0", GGML_TYPE_Q4_0, "4-bit blocks of 32: about a quarter (needs flash attention)");

    py::class_<Model, std::shared_ptr<Model>>(m, "Model",
                                             "A text model and its optional projector, loaded once and shared by "
                                             "its sessions; close() frees everything.")
        .def_static(
            "load",
            [](const std::string & model_path, const std::string & mmproj_path, int32_t n_gpu_layers,
               bool mmproj_use_gpu, int32_t n_threads, bool verbose, size_t embed_cache_bytes,
               llama_flash_attn_type flash_attn, const std::string & main_gpu, ggml_type type_k, ggml_type type_v) {
                ModelParams params;
                params.flash_attn = flash_attn;
                params.type_k = type_k;
                params.type_v = type_v;
                params.main_gpu = main_gpu;
                params.n_gpu_layers = n_gpu_layers;
                params.mmproj_use_gpu = mmproj_use_gpu;
                params.n_threads = n_threads;
                params.verbose = verbose;
                params.embed_cache_bytes = embed_cache_bytes;
                return without_gil([&] { return Model::load(model_path, mmproj_path, params); });
            },
            py::arg("model_path"), py::arg("mmproj_path") = "", py::kw_only(), py::arg("n_gpu_layers") = 0,
            py::arg("mmproj_use_gpu") = true, py::arg("n_threads") = 0, py::arg("verbose") = false,
            py::arg("embed_cache_bytes") = size_t(1) << 30, py::arg("flash_attn") = LLAMA_FLASH_ATTN_TYPE_AUTO,
            py::arg("main_gpu") = "", py::arg("type_k") = GGML_TYPE_F16, py::arg("type_v") = GGML_TYPE_F16,
            "Load a GGUF text model and, optionally, its mmproj projector (ModelLoadError if either is corrupt "
            "or they do not match).")
        .def("close", released(&Model::close),
             "Close every session and batch runner of the model, then free the projector and the weights.")
        .def_property_readonly("closed", &Model::closed, "close() has run")
        .def_property_readonly("path", &Model::path, "the text model GGUF")
        .def_property_readonly("mmproj_path", &Model::mmproj_path, "the projector GGUF ('' without one)")
        .def_property_readonly("n_embd", &Model::n_embd, "the text model's width")
        .def_property_readonly("n_vocab", &Model::n_vocab, "tokens in the vocabulary")
        .def_property_readonly("n_ctx_train", &Model::n_ctx_train, "the context length the model was trained for")
        .def_property_readonly("has_vision", &Model::has_vision, "the projector has a vision encoder")
        .def_property_readonly("has_audio", &Model::has_audio, "the projector has an audio encoder")
        .def_property_readonly("audio_sample_rate", &Model::audio_sample_rate, "Hz audio samples must have (-1 without audio)")
        .def(
            "decode_audio",
            [](Model & model, const py::bytes & data) {
                const std::string bytes = data;
                const std::vector<float> samples = without_gil([&] {
                    auto hold = model.hold();
                    return decode_audio(model, bytes);
                });
                py::array_t<float> out(static_cast<py::ssize_t>(samples.size()));
                std::copy(samples.begin(), samples.end(), out.mutable_data());
                return out;
            },
            py::arg("data"), "Mono float32 samples at the projector's rate from wav/mp3/flac bytes.")
        .def_property_readonly("uses_mrope", &Model::uses_mrope, "media positions are M-RoPE (fewer positions than KV cells)")
        .def_property_readonly("n_threads", &Model::n_threads, "CPU threads of the model's contexts")
        .def_property_readonly("description", &Model::description, "llama.cpp's one-line description of the text model")
        .def_property_readonly("flash_attn", [](const Model & model) { return model.params().flash_attn; },
                               "llama.cpp's flash attention choice for every context")
        .def_property_readonly("main_gpu", [](const Model & model) { return model.params().main_gpu; },
                               "the device named at load ('' for llama.cpp's choice)")
        .def_property_readonly("type_k", [](const Model & model) { return model.params().type_k; },
                               "the K cache's element type")
        .def_property_readonly("type_v", [](const Model & model) { return model.params().type_v; },
                               "the V cache's element type")
        .def_property_readonly("media_marker", [](const Model &) { return std::string(mtmd_default_marker()); },
                               "the text that stands for an image or clip in a prompt (mtmd's marker)")
        .def(
            "session",
            [](Model & model, int32_t n_ctx, int32_t n_batch, int32_t n_ubatch, uint32_t seed, int32_t n_threads) {
                const SessionParams params = session_params(n_ctx, n_batch, n_ubatch, seed, n_threads);
                return without_gil([&] { return model.open_session(params); });
            },
            py::kw_only(), py::arg("n_ctx") = 4096, py::arg("n_batch") = 512, py::arg("n_ubatch") = 0,
            py::arg("seed") = 0, py::arg("n_threads") = 0,
            "A new session with a context of its own (n_ubatch 0: as n_batch; n_threads 0: the model's).")
        .def(
            "session_pool",
            [](Model & model, int32_t n_slots, int32_t n_ctx, int32_t n_batch, int32_t n_ubatch, uint32_t seed,
               int32_t n_threads) {
                const SessionParams params = session_params(n_ctx, n_batch, n_ubatch, seed, n_threads);
                return without_gil([&] { return model.open_pool(params, n_slots); });
            },
            py::arg("n_slots"), py::kw_only(), py::arg("n_ctx") = 4096, py::arg("n_batch") = 512,
            py::arg("n_ubatch") = 0, py::arg("seed") = 0, py::arg("n_threads") = 0,
            "n_slots sessions sharing one context, a sequence and n_ctx KV cells each; their generation steps "
            "can run together in one batched decode (step_sessions).")
        .def("n_open_sessions",
             [](const Model & model) { return without_gil([&] { return model.live_sessions().size(); }); },
             "Sessions made from the model and not yet closed.")
        .def(
            "tokenize",
            [](const Model & model, const std::string & text, bool add_special) {
                return without_gil([&] {
                    auto hold = model.hold();
                    return model.tokenize(text, add_special);
                });
            },
            py::arg("text"), py::arg("add_special") = false,
            "The model's tokens for text (special tokens parsed; add_special: BOS where the model adds it).")
        .def(
            "detokenize",
            [](const Model & model, const std::vector<llama_token> & tokens) {
                std::string text = without_gil([&] {
                    auto hold = model.hold();
                    model.check_token_ids(tokens);
                    std::string out(tokens.size() * 8 + 16, '\0');
                    for (int attempt = 0; attempt < 2; ++attempt) {
                        const int32_t n = llama_detokenize(model.vocab(), tokens.data(),
                                                           static_cast<int32_t>(tokens.size()), out.data(),
                                                           static_cast<int32_t>(out.size()), false, false);
                        if (n >= 0) {
                            out.resize(static_cast<size_t>(n));
                            return out;
                        }
                        out.resize(static_cast<size_t>(-n));
                    }
                    throw Error("llama.cpp could not detokenize the tokens");
                });
                return py::bytes(text);
            },
            py::arg("tokens"),
            "llama.cpp's text of the tokens, as bytes (the space a tokenizer puts before the first word removed).")
        .def(
            "token_pieces",
            [](const Model & model, const std::vector<llama_token> & tokens) {
                std::vector<std::string> pieces = without_gil([&] {
                    auto hold = model.hold();
                    return model.pieces_of(tokens);
                });
                py::list out;
                for (const auto & p : pieces) {
                    out.append(py::bytes(p));
                }
                return out;
            },
            py::arg("tokens"), "The bytes of each token (ValueError for an id outside the vocabulary).")
        .def(
            "check_sampling",
            [](const Model & model, const SamplingParams & p) {
                without_gil([&] {
                    auto hold = model.hold();
                    make_sampler_chain(p, model);
                });
            },
            py::arg("sampling"),
            "Raises ValueError for settings (or a grammar) a generation on this model would refuse.")
        .def("memory", [](const Model & model) { return without_gil([&] { return model.memory(); }); },
             "Bytes held per component and device, and every device's memory now.")
        .def("cache_stats",
             [](Model & model) { return without_gil([&] { return model.embedding_cache().stats(); }); },
             "Use and size of the model's shared embedding cache.")
        .def_property_readonly("chat_template", py::cpp_function(released(&Model::chat_template)),
                               "the chat template in the GGUF's metadata ('' without one)")
        .def("apply_chat_template", released(&Model::apply_chat_template), py::arg("messages"),
             py::arg("add_assistant") = true, py::arg("template_override") = "",
             "(role, content) messages rendered by llama.cpp's template engine with the GGUF's template, or with "
             "template_override (a built-in name such as 'chatml', or a template string).")
        .def("clear_cache", [](Model & model) { model.embedding_cache().clear(); },
             "Drop every embedding of the shared cache (timelines keep theirs).");
}

}  // namespace llava_kv::bindings
