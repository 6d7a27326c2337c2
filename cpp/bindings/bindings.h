// Registration functions of the binding areas; module.cpp calls them in order.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <exception>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#if defined(__GLIBCXX__)
#include <cxxabi.h>
#endif

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

// Runs `call` with the GIL released; its result (or its exception) comes back with the GIL held.
// An exception is caught while the GIL is still released and rethrown once it is held again, never
// carried through ~ReleasedGil: at interpreter shutdown the GIL's return can be pthread_exit (see
// above), and a forced unwind that meets an exception in flight is std::terminate. (atexit closes
// every model, which cancels a generation running in a daemon thread: exactly that case.)
template <typename Call>
auto without_gil(Call && call) -> std::decay_t<decltype(call())> {
    using Result = std::decay_t<decltype(call())>;
    if constexpr (std::is_void_v<Result>) {
        without_gil([&] {
            call();
            return true;
        });
    } else {
        std::optional<Result> result;
        std::exception_ptr error;
        {
            ReleasedGil release;
            try {
                result.emplace(call());
#if defined(__GLIBCXX__)
            } catch (abi::__forced_unwind &) {
                throw;
#endif
            } catch (...) {
                error = std::current_exception();
            }
        }
        if (error) {
            std::rethrow_exception(error);
        }
        return std::move(*result);
    }
}

// A member function bound to run without the GIL (what py::call_guard<ReleasedGil> would do, with
// without_gil's care for exceptions).
template <typename R, typename C, typename... A>
auto released(R (C::*f)(A...)) {
    return [f](C & self, A... args) { return without_gil([&]() -> R { return (self.*f)(std::forward<A>(args)...); }); };
}
template <typename R, typename C, typename... A>
auto released(R (C::*f)(A...) const) {
    return [f](const C & self, A... args) {
        return without_gil([&]() -> R { return (self.*f)(std::forward<A>(args)...); });
    };
}
template <typename R, typename... A>
auto released(R (*f)(A...)) {
    return [f](A... args) { return without_gil([&]() -> R { return f(std::forward<A>(args)...); }); };
}

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
        return without_gil(std::forward<Call>(call));
#if defined(__GLIBCXX__)
    } catch (abi::__forced_unwind &) {
        throw;  // this thread is ending (interpreter shutdown): no Python to raise into
#endif
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

void register_errors(pybind11::module_ & m);
void register_devices(pybind11::module_ & m);
void register_results(pybind11::module_ & m);
void register_sampling(pybind11::module_ & m);
void register_model(pybind11::module_ & m);
void register_session(pybind11::module_ & m);
void register_batch(pybind11::module_ & m);
void register_testing(pybind11::module_ & m);

}  // namespace llava_kv::bindings
