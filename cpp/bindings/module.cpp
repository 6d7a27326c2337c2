#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "live_objects.h"
#include "model.h"
#include "runtime.h"

#ifndef LLAVA_KV_VERSION
#define LLAVA_KV_VERSION "0.0.0"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
    m.doc() = "llava-kv native core (private: use the llava_kv package)";
    llava_kv::ensure_runtime();
    llava_kv::bindings::register_errors(m);
    llava_kv::bindings::register_devices(m);
    llava_kv::bindings::register_results(m);
    llava_kv::bindings::register_sampling(m);
    llava_kv::bindings::register_model(m);
    llava_kv::bindings::register_testing(m);  // before the sessions: reference_eval goes in _testing
    llava_kv::bindings::register_session(m);
    llava_kv::bindings::register_batch(m);

    m.def(
        "build_info",
        [] {
            llava_kv::BuildInfo info = llava_kv::bindings::without_gil([] { return llava_kv::build_info(); });
            info.version = LLAVA_KV_VERSION;  // the package's version is known to the module, not the core
            return info;
        },
        "The llava-kv version, the llama.cpp commit, the compiled backends and the devices they see.");
    m.def("native_objects", [] { return llava_kv::live_counts(); },
          "Native models, sessions and batch runners alive in this process (leak checks): a NativeObjects.");
    m.attr("__version__") = LLAVA_KV_VERSION;
}
