// Maps the core's C++ exceptions to the Python classes of llava_kv.errors.
#include <pybind11/pybind11.h>

#include "bindings.h"
#include "errors.h"

namespace py = pybind11;

namespace llava_kv::bindings {
namespace {

// Messages may quote bytes of a corrupt file: never let their decoding be the error raised.
void raise(const char * name, const std::exception & e) {
    py::object cls = py::module_::import("llava_kv.errors").attr(name);
    PyErr_SetObject(cls.ptr(), cls(utf8(e.what())).ptr());
}

}  // namespace

void register_errors(py::module_ & /*m*/) {
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) {
                std::rethrow_exception(p);
            }
        } catch (const ContextFullError & e) {
            py::object cls = py::module_::import("llava_kv.errors").attr("ContextFullError");
            py::object exc = cls(utf8(e.what()), py::arg("needed") = e.needed, py::arg("available") = e.available);
            PyErr_SetObject(cls.ptr(), exc.ptr());
        } catch (const ModelLoadError & e) {
            raise("ModelLoadError", e);
        } catch (const ImageError & e) {
            raise("ImageError", e);
        } catch (const AudioError & e) {
            raise("AudioError", e);
        } catch (const MediaError & e) {
            raise("MediaError", e);
        } catch (const ClosedError & e) {
            raise("ClosedError", e);
        } catch (const CancelledError & e) {
            raise("CancelledError", e);
        } catch (const GrammarError & e) {
            raise("GrammarError", e);
        } catch (const Error & e) {
            raise("LlavaKVError", e);
        } catch (const NotFoundError & e) {
            PyErr_SetObject(PyExc_KeyError, utf8(e.what()).ptr());
        }
    });
}

}  // namespace llava_kv::bindings
