// Maps the core's C++ exceptions to the Python classes of llava_kv.errors.
#include <pybind11/pybind11.h>

#include "bindings.h"
#include "errors.h"

namespace py = pybind11;

namespace llava_kv::bindings {
namespace {

void raise(const char * name, const std::exception & e) {
    py::object cls = py::module_::import("llava_kv.errors").attr(name);
    PyErr_SetObject(cls.ptr(), cls(e.what()).ptr());
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
            py::object exc = cls(e.what(), py::arg("needed") = e.needed, py::arg("available") = e.available);
            PyErr_SetObject(cls.ptr(), exc.ptr());
        } catch (const ModelLoadError & e) {
            raise("ModelLoadError", e);
        } catch (const ImageError & e) {
            raise("ImageError", e);
        } catch (const ClosedError & e) {
            raise("ClosedError", e);
        } catch (const CancelledError & e) {
            raise("CancelledError", e);
        } catch (const Error & e) {
            raise("LlavaKVError", e);
        } catch (const NotFoundError & e) {
            PyErr_SetString(PyExc_KeyError, e.what());
        }
    });
}

}  // namespace llava_kv::bindings
