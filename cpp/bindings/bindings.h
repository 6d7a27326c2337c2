// Registration functions of the binding areas; module.cpp calls them in order.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "sampling.h"

namespace llava_kv::bindings {

// Pixels as the core reads them; forcecast lets any integer array through to the shape check.
using RgbArray = pybind11::array_t<uint8_t, pybind11::array::c_style | pybind11::array::forcecast>;

// Text that came from a model may hold invalid UTF-8 (byte tokens): decode with replacement.
inline pybind11::str utf8(const std::string & s) {
    return pybind11::reinterpret_steal<pybind11::str>(
        PyUnicode_DecodeUTF8(s.data(), static_cast<pybind11::ssize_t>(s.size()), "replace"));
}

inline SamplingParams sampling_params(float temperature, int32_t top_k, float top_p, float min_p,
                                      float repeat_penalty, int32_t repeat_last_n, uint32_t seed) {
    SamplingParams p;
    p.temperature = temperature;
    p.top_k = top_k;
    p.top_p = top_p;
    p.min_p = min_p;
    p.repeat_penalty = repeat_penalty;
    p.repeat_last_n = repeat_last_n;
    p.seed = seed;
    return p;
}

void register_errors(pybind11::module_ & m);
void register_model(pybind11::module_ & m);
void register_session(pybind11::module_ & m);
void register_batch(pybind11::module_ & m);

}  // namespace llava_kv::bindings
