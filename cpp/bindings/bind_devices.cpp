#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "device_ledger.h"
#include "runtime.h"

namespace py = pybind11;

namespace llava_kv::bindings {

void register_devices(py::module_ & m) {
    py::class_<DeviceInfo>(m, "Device", "One backend device: the same record in devices(), build_info() and "
                                         "Model.memory().")
        .def_readonly("name", &DeviceInfo::name, "ggml's name for it: 'CPU', 'Vulkan0', 'CUDA0'")
        .def_readonly("type", &DeviceInfo::type, "'cpu', 'gpu', 'igpu' (integrated) or 'accel' (e.g. BLAS, NPU)")
        .def_readonly("description", &DeviceInfo::description, "what the driver calls it")
        .def_readonly("free", &DeviceInfo::free,
                      "bytes free as the driver reports them (free == total where it cannot tell; on Mesa's "
                      "lavapipe the whole machine's, not this process's)")
        .def_readonly("total", &DeviceInfo::total, "bytes the device has")
        .def_readonly("allocated", &DeviceInfo::allocated,
                      "bytes of this process's live ggml buffers on the device (the device ledger)")
        .def("as_dict",
             [](const DeviceInfo & d) {
                 py::dict out;
                 out["name"] = d.name;
                 out["type"] = d.type;
                 out["description"] = d.description;
                 out["free"] = d.free;
                 out["total"] = d.total;
                 out["allocated"] = d.allocated;
                 return out;
             },
             "the record as a dict (for JSON)")
        .def("__repr__", [](const DeviceInfo & d) {
            return "<llava_kv.Device " + d.name + " type=" + d.type + " free=" + std::to_string(d.free) +
                   " total=" + std::to_string(d.total) + " allocated=" + std::to_string(d.allocated) + ">";
        });

    py::class_<LedgerEntry>(m, "LedgerEntry", "Live ggml buffers of one component on one device.")
        .def_readonly("device", &LedgerEntry::device, "the device's name")
        .def_readonly("component", &LedgerEntry::component,
                      "'weights', 'projector', 'kv', 'compute', or 'other' (allocated outside any model call)")
        .def_readonly("session_id", &LedgerEntry::session_id, "the session of a 'kv'/'compute' entry (0: a pool's "
                      "or batch runner's context, or none)")
        .def_readonly("bytes", &LedgerEntry::bytes, "bytes held")
        .def_readonly("buffers", &LedgerEntry::buffers, "how many buffers");

    m.def("devices", [] { return without_gil([] { return devices(); }); },
          "Every backend device this build sees, with its memory and this process's allocations there.");
    m.def("device_ledger", [] { return without_gil([] { return device_ledger(); }); },
          "This process's live ggml buffers, per device and component.");
}

}  // namespace llava_kv::bindings
