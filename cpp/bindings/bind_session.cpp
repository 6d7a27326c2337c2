#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "reference.h"
#include "session.h"

namespace py = pybind11;

namespace llava_kv::bindings {
namespace {

// Python passes each new chunk as a str (text) or a tuple (HxWx3 uint8 array, digest, source).
// The arrays stay referenced here while the GIL is released and the core reads them.
struct Inputs {
    std::vector<RgbArray> arrays;
    std::vector<ChunkInput> chunks;
};

Inputs convert(const py::list & items) {
    Inputs out;
    out.arrays.reserve(items.size());
    for (const py::handle & item : items) {
        ChunkInput input;
        if (py::isinstance<py::str>(item)) {
            input.kind = ChunkKind::Text;
            input.text = item.cast<std::string>();
        } else {
            auto tuple = item.cast<py::tuple>();
            if (tuple.size() != 3) {
                throw py::type_error("an image chunk is (pixels, digest, source)");
            }
            RgbArray pixels = RgbArray::ensure(tuple[0]);
            if (!pixels || pixels.ndim() != 3 || pixels.shape(2) != 3) {
                throw py::value_error("image pixels must be an HxWx3 uint8 array");
            }
            input.kind = ChunkKind::Image;
            input.image.data = pixels.data();
            input.image.height = static_cast<uint32_t>(pixels.shape(0));
            input.image.width = static_cast<uint32_t>(pixels.shape(1));
            input.image.digest = tuple[1].cast<std::string>();
            input.image.source = tuple[2].cast<std::string>();
            out.arrays.push_back(std::move(pixels));
        }
        out.chunks.push_back(std::move(input));
    }
    return out;
}

py::dict chunk_dict(const ChunkInfo & c) {
    py::dict d;
    d["id"] = c.id;
    d["kind"] = c.kind == ChunkKind::Text ? "text" : "image";
    d["n_tokens"] = c.n_tokens;
    d["pos0"] = c.pos0;
    d["pos1"] = c.pos1;
    d["source"] = utf8(c.source);
    d["generated"] = c.generated;
    if (c.kind == ChunkKind::Image) {
        d["digest"] = c.digest;
        d["width"] = c.width;
        d["height"] = c.height;
    } else {
        d["tokens"] = c.tokens;
    }
    return d;
}

}  // namespace

void register_session(py::module_ & m) {
    // For tests: what mtmd_tokenize + mtmd_helper_eval_chunks give for one prompt with markers.
    m.def(
        "reference_eval",
        [](Model & model, const std::string & prompt, const py::list & images, int32_t n_ctx, int32_t n_batch) {
            Inputs inputs = convert(images);
            std::vector<ImagePixels> pixels;
            for (const auto & c : inputs.chunks) {
                pixels.push_back(c.image);
            }
            ReferenceResult r;
            {
                py::gil_scoped_release release;
                r = reference_eval(model, prompt, pixels, n_ctx, n_batch);
            }
            py::array_t<float> logits(static_cast<py::ssize_t>(r.logits.size()));
            std::copy(r.logits.begin(), r.logits.end(), logits.mutable_data());
            return py::make_tuple(r.tokens, r.n_past, logits);
        },
        py::arg("model"), py::arg("prompt"), py::arg("images"), py::arg("n_ctx") = 4096, py::arg("n_batch") = 512);

    py::class_<Session, std::shared_ptr<Session>>(m, "Session")
        .def("close", &Session::close, py::call_guard<py::gil_scoped_release>())
        .def_property_readonly("closed", &Session::closed)
        .def_property_readonly("id", &Session::id)
        .def(
            "splice",
            [](Session & s, size_t begin, size_t end, const py::list & items) {
                Inputs inputs = convert(items);
                py::gil_scoped_release release;
                return s.splice(begin, end, inputs.chunks);
            },
            py::arg("begin"), py::arg("end"), py::arg("items"))
        .def("remove_shift", &Session::remove_shift, py::arg("chunk_id"), py::call_guard<py::gil_scoped_release>())
        .def("remove_chunks", &Session::remove_chunks, py::arg("chunk_ids"),
             py::call_guard<py::gil_scoped_release>())
        .def("index_of", &Session::index_of, py::arg("chunk_id"))
        .def("clear", &Session::clear, py::call_guard<py::gil_scoped_release>())
        .def("cancel", &Session::cancel)
        .def("timeline",
             [](const Session & s) {
                 py::list out;
                 for (const auto & c : s.timeline()) {
                     out.append(chunk_dict(c));
                 }
                 return out;
             })
        .def("logits",
             [](const Session & s) {
                 std::vector<float> logits;
                 {
                     py::gil_scoped_release release;
                     logits = s.logits();
                 }
                 py::array_t<float> out(static_cast<py::ssize_t>(logits.size()));
                 std::copy(logits.begin(), logits.end(), out.mutable_data());
                 return out;
             })
        .def_property_readonly("n_past", &Session::n_past)
        .def_property_readonly("n_cells", &Session::n_cells)
        .def_property_readonly("n_ctx", &Session::n_ctx)
        .def_property_readonly("n_batch", [](const Session & s) { return s.params().n_batch; })
        .def("tokenize", &Session::tokenize, py::arg("text"), py::arg("add_special") = false)
        .def(
            "begin_generation",
            [](Session & s, float temperature, int32_t top_k, float top_p, float min_p, float repeat_penalty,
               int32_t repeat_last_n, uint32_t seed) {
                s.begin_generation(
                    sampling_params(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed));
            },
            py::kw_only(), py::arg("temperature") = 0.0f, py::arg("top_k") = 40, py::arg("top_p") = 0.95f,
            py::arg("min_p") = 0.05f, py::arg("repeat_penalty") = 1.0f, py::arg("repeat_last_n") = 64,
            py::arg("seed") = 0)
        .def("generate_step",
             [](Session & s) {
                 GenerationStep step;
                 {
                     py::gil_scoped_release release;
                     step = s.generate_step();
                 }
                 return py::make_tuple(step.token, py::bytes(step.text), step.end_of_generation);
             })
        .def("save_state",
             [](const Session & s) {
                 std::string blob;
                 {
                     py::gil_scoped_release release;
                     blob = s.save_state();
                 }
                 return py::bytes(blob);
             })
        .def("load_state",
             [](Session & s, const py::bytes & blob) {
                 std::string data = blob;
                 py::gil_scoped_release release;
                 s.load_state(data);
             })
        .def("flush_generation", [](Session & s) { return py::bytes(s.flush_generation()); })
        .def("detokenize", [](const Session & s, const std::vector<llama_token> & tokens) {
            return py::bytes(s.detokenize(tokens));
        })
        .def("stats", [](const Session & s) {
            const SessionStats st = s.stats();
            py::dict d;
            d["tokens_decoded"] = st.registry.tokens_decoded;
            d["text_tokens_decoded"] = st.registry.text_tokens_decoded;
            d["image_tokens_decoded"] = st.registry.image_tokens_decoded;
            d["images_decoded"] = st.registry.images_decoded;
            d["images_encoded"] = st.encode.images_encoded;
            d["embed_cache_hits"] = st.encode.embed_cache_hits;
            d["embed_cache_misses"] = st.encode.embed_cache_misses;
            d["batched_encodes"] = st.encode.batched_encodes;
            d["tokens_generated"] = st.tokens_generated;
            d["kv_cells_removed"] = st.registry.kv_cells_removed;
            d["decode_calls"] = st.registry.decode_calls;
            d["full_redecodes"] = st.registry.full_redecodes;
            d["shift_edits"] = st.registry.shift_edits;
            return d;
        });
}

}  // namespace llava_kv::bindings
