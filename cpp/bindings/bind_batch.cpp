#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>

#include "batch_runner.h"
#include "bindings.h"

namespace py = pybind11;

namespace llava_kv::bindings {
namespace {


}  // namespace

void register_batch(py::module_ & m) {
    py::class_<BatchResult>(m, "BatchResult", "What one job of a batch runner produced (or why it failed).")
        .def_readonly("id", &BatchResult::id, "the job's id, as submitted")
        .def_property_readonly("source", [](const BatchResult & r) { return utf8(r.source); },
                               "the image's path or description")
        .def_property_readonly("text", [](const BatchResult & r) { return utf8(r.text); }, "the generated text")
        .def_readonly("n_tokens", &BatchResult::n_tokens, "tokens generated")
        .def_readonly("n_prompt_tokens", &BatchResult::n_prompt_tokens,
                      "tokens the job decoded itself (image and prompt text), not the shared prefix")
        .def_readonly("finish_reason", &BatchResult::finish_reason, "'stop' or 'length'; '' on error")
        .def_property_readonly("error", [](const BatchResult & r) { return utf8(r.error); },
                               "why the job failed ('' if it did not)")
        .def_readonly("cached", &BatchResult::cached, "the embedding came from the cache")
        .def_readonly("load_ms", &BatchResult::load_ms, "decoding the image file (the caller's loader)")
        .def_readonly("encode_ms", &BatchResult::encode_ms, "the projector's share for this image")
        .def_readonly("wait_ms", &BatchResult::wait_ms, "encoded, waiting for a free sequence")
        .def_readonly("prefill_ms", &BatchResult::prefill_ms, "image and prompt decoded, first token sampled")
        .def_readonly("generate_ms", &BatchResult::generate_ms, "the rest of the answer")
        .def_readonly("total_ms", &BatchResult::total_ms, "load + from submit to the result");

    py::class_<BatchRunner, std::shared_ptr<BatchRunner>>(m, "BatchRunner",
                                                         "One prompt over many images: a worker thread encodes, "
                                                         "decodes and generates them in parallel sequences.")
        .def_static(
            "start",
            [](std::shared_ptr<Model> model, const std::string & prefix, const std::string & suffix,
               int32_t n_parallel, int32_t max_tokens, int32_t n_ctx, int32_t n_batch, int32_t n_threads,
               const SamplingParams & sampling, std::vector<std::string> stop, int32_t queue_size,
               int32_t encode_ahead, bool start_after_finish) {
                BatchParams p;
                p.prefix = prefix;
                p.suffix = suffix;
                p.n_parallel = n_parallel;
                p.max_tokens = max_tokens;
                p.n_ctx = n_ctx;
                p.n_batch = n_batch;
                p.n_threads = n_threads;
                p.sampling = sampling;
                p.stop = std::move(stop);
                p.queue_size = queue_size;
                p.encode_ahead = encode_ahead;
                p.start_after_finish = start_after_finish;
                return without_gil([&] { return BatchRunner::start(std::move(model), p); });
            },
            py::arg("model"), py::kw_only(), py::arg("prefix"), py::arg("suffix"), py::arg("n_parallel") = 4,
            py::arg("max_tokens") = 64, py::arg("n_ctx") = 0, py::arg("n_batch") = 512, py::arg("n_threads") = 0,
            py::arg("sampling") = SamplingParams{}, py::arg("stop") = std::vector<std::string>{},
            py::arg("queue_size") = 0, py::arg("encode_ahead") = 0, py::arg("start_after_finish") = false,
            "Start a runner for prefix + <image> + suffix (n_ctx 0: sized from the first image; queue_size 0: "
            "2 * n_parallel; encode_ahead 0: n_parallel; start_after_finish: the worker takes no job before "
            "finish(), and submit() raises instead of blocking on a full queue).")
        .def(
            "submit",
            [](BatchRunner & runner, uint64_t id, py::object pixels, const std::string & digest,
               const std::string & source, const std::string & error, double load_ms) {
                BatchJob job;
                job.id = id;
                job.digest = digest;
                job.source = source;
                job.error = error;
                job.load_ms = load_ms;
                if (!pixels.is_none()) {
                    // No silent conversion of other dtypes (a float image would wrap around).
                    if (!py::isinstance<py::array>(pixels) ||
                        !pixels.cast<py::array>().dtype().is(py::dtype::of<uint8_t>())) {
                        throw py::value_error("image pixels must be an HxWx3 uint8 array");
                    }
                    RgbArray a = RgbArray::ensure(pixels);
                    if (!a || a.ndim() != 3 || a.shape(2) != 3) {
                        throw py::value_error("image pixels must be an HxWx3 uint8 array");
                    }
                    job.height = static_cast<uint32_t>(a.shape(0));
                    job.width = static_cast<uint32_t>(a.shape(1));
                    job.pixels.resize(static_cast<size_t>(a.size()));
                    std::memcpy(job.pixels.data(), a.data(), job.pixels.size());
                }
                without_gil([&] { runner.submit(std::move(job)); });
            },
            py::arg("id"), py::arg("pixels"), py::arg("digest"), py::arg("source"), py::arg("error") = "",
            py::arg("load_ms") = 0.0,
            "Queue one job (pixels None with an error: a result that reports it); blocks while the queue is full.")
        .def("finish", released(&BatchRunner::finish), "No more jobs will be submitted.")
        .def("next",
             [](BatchRunner & runner) -> py::object {
                 BatchResult r;
                 bool got = without_gil([&] { return runner.next(r); });
                 if (!got) {
                     return py::none();
                 }
                 return py::cast(std::move(r));
             },
             "The next finished job, as jobs complete (blocks); None once every result is taken after finish().")
        .def("close", released(&BatchRunner::close), "Stop the worker and free the context; idempotent.")
        .def("restart", released(&BatchRunner::restart),
             "Take jobs again on the same context (the shared prefix's KV kept) once every result of the run "
             "was taken or the run was cancelled; counters start over. RuntimeError while a run is going on.")
        .def("cancel_run", released(&BatchRunner::cancel_run),
             "End the current run early: submit() raises CancelledError, queued jobs are dropped, running ones "
             "stop; restart() then runs again on the same context.")
        .def_property_readonly("closed", &BatchRunner::closed, "close() has run")
        .def("stats", released(&BatchRunner::stats), "Counters of the runner's work so far.");
}

}  // namespace llava_kv::bindings
