// Registration functions of the binding areas; module.cpp calls them in order.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "sampling.h"

namespace llava_kv::bindings {

// Releases the GIL for the length of a native call, like py::gil_scoped_release, with one
// difference: at interpreter shutdown Python ends a daemon thread that asks for the GIL back with
// pthread_exit, whose unwinding must pass through this destructor. py::gil_scoped_release's is
// noexcept, so there the process would std::terminate instead of the thread ending.
class ReleasedGil {
  public:
    ReleasedGil() : state_(PyEval_SaveThread()) {}
    ~ReleasedGil() noexcept(false) { PyEval_RestoreThread(state_); }
    ReleasedGil(const ReleasedGil &) = delete;
    ReleasedGil & operator=(const ReleasedGil &) = delete;

  private:
    PyThreadState * state_;
};

// Ctrl-C during a long native call made on the main thread. Python's SIGINT handler only notes the
// signal for the interpreter to act on once the call returns; for the length of the scope a handler
// of ours also calls `cancel(target)` (a lock-free store), then chains to Python's. Construct and
// destroy it with the GIL held.
class InterruptScope {
  public:
    using CancelFn = void (*)(void *);
    InterruptScope(CancelFn cancel, void * target);
    ~InterruptScope();
    InterruptScope(const InterruptScope &) = delete;
    InterruptScope & operator=(const InterruptScope &) = delete;

    // Whether SIGINT arrived during the scope; then Python's handler is run (KeyboardInterrupt by
    // default) and its exception thrown as py::error_already_set.
    void raise_if_interrupted() const;

  private:
    bool installed_ = false;
};

// Runs `call` with the GIL released and Ctrl-C cancelling it: a call cancelled by Ctrl-C ends in
// KeyboardInterrupt (Python's handler), one cancelled otherwise in CancelledError.
template <typename Target, typename Call>
auto interruptible(Target & target, Call && call) -> decltype(call()) {
    InterruptScope scope([](void * t) { static_cast<Target *>(t)->cancel(); }, &target);
    try {
        ReleasedGil release;
        return call();
    } catch (...) {
        scope.raise_if_interrupted();
        throw;
    }
}

// Pixels as the core reads them (C order); callers check the dtype is uint8 first.
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
