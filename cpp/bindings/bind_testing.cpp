// Test hooks, kept out of the public module: _core._testing. They fault, pause or reseal on
// purpose, so that every rollback path can be made to run (STYLE convention 16).
#include <pybind11/pybind11.h>

#include <string>

#include "bindings.h"
#include "decode.h"
#include "model.h"
#include "session_state.h"

namespace py = pybind11;

namespace llava_kv::bindings {
namespace {

DecodeFault decode_fault(const std::string & kind) {
    if (kind == "status") {
        return DecodeFault::Status;
    }
    if (kind == "exception") {
        return DecodeFault::Exception;
    }
    if (kind == "cancel") {
        return DecodeFault::Cancel;
    }
    if (kind == "close") {
        return DecodeFault::Close;
    }
    if (kind == "pause") {
        return DecodeFault::Pause;
    }
    if (kind != "none") {
        throw py::value_error("kind must be 'status', 'exception', 'cancel', 'close', 'pause' or 'none'");
    }
    return DecodeFault::None;
}

}  // namespace

void register_testing(py::module_ & m) {
    py::module_ t = m.def_submodule("_testing", "Test hooks of the native core (fault injection, state resealing, "
                                                "the mtmd reference evaluation). Never call them outside tests "
                                                "(selfcheck runs the reference evaluation).");
    t.def(
        "arm_decode_fault", [](uint64_t nth, const std::string & kind) { arm_decode_fault(nth, decode_fault(kind)); },
        py::arg("nth"), py::arg("kind"),
        "The nth decode call from now (1: the next) fails with a bad status or a C++ exception, gets a real "
        "cancel() or close(), or pauses until release_decode_pause(); 'none' disarms.");
    t.def("wait_decode_paused", released(&wait_decode_paused), py::arg("timeout_s"),
          "Waits until a decode armed with 'pause' is paused; False on timeout.");
    t.def("release_decode_pause", released(&release_decode_pause), "Lets the paused decode go on.");
    t.def("threads_rested", &threads_rested,
          "How many times a context's CPU workers were sent to sleep before the projector computed.");
    t.def(
        "seal_state", [](const py::bytes & blob) { return py::bytes(reseal_state(std::string(blob))); },
        py::arg("blob"), "Recomputes a state blob's size and checksum after a test changed it on purpose.");
}

}  // namespace llava_kv::bindings
