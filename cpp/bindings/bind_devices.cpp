#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "device_ledger.h"
#include "runtime.h"

namespace py = pybind11;

namespace llava_kv::bindings {

void register_devices(py::module_ & m) {
    m.def("devices", [] { return without_gil([] { return devices(); }); },
          "Every backend device this build sees, with its memory and this process's allocations there.");
    m.def("device_ledger", [] { return without_gil([] { return device_ledger(); }); },
          "This process's live ggml buffers, per device and component.");
}

}  // namespace llava_kv::bindings
