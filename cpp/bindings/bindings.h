// Registration functions of the binding areas; module.cpp calls them in order.
#pragma once

#include <pybind11/pybind11.h>

namespace llava_kv::bindings {

void register_errors(pybind11::module_ & m);
void register_model(pybind11::module_ & m);
void register_session(pybind11::module_ & m);
void register_batch(pybind11::module_ & m);

}  // namespace llava_kv::bindings
