#include <csignal>

#include <atomic>

#include "bindings.h"

namespace py = pybind11;

namespace llava_kv::bindings {
namespace {

// One scope at a time (the main thread runs one call at a time); the handler reads these.
std::atomic<InterruptScope::CancelFn> g_cancel{nullptr};
std::atomic<void *> g_target{nullptr};
std::atomic<bool> g_fired{false};
struct sigaction g_previous {};

void on_sigint(int signo, siginfo_t * info, void * context) {
    g_fired.store(true);
    InterruptScope::CancelFn cancel = g_cancel.load();
    if (cancel != nullptr) {
        cancel(g_target.load());
    }
    if (g_previous.sa_flags & SA_SIGINFO) {
        g_previous.sa_sigaction(signo, info, context);
    } else if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN) {
        g_previous.sa_handler(signo);
    }
}

// Called with the GIL held, once per native call: the main thread's id is looked up once.
bool on_main_thread() {
    static const unsigned long main_ident =
        py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
    return PyThread_get_thread_ident() == main_ident;
}

}  // namespace

InterruptScope::InterruptScope(CancelFn cancel, void * target) {
    if (g_cancel.load() != nullptr || !on_main_thread()) {
        return;  // nested, or a thread Ctrl-C is not delivered to in Python
    }
    struct sigaction current {};
    if (sigaction(SIGINT, nullptr, &current) != 0) {
        return;
    }
    const bool python_handles = (current.sa_flags & SA_SIGINFO) ||
                                (current.sa_handler != SIG_DFL && current.sa_handler != SIG_IGN);
    if (!python_handles) {
        return;  // SIGINT ignored or fatal: nothing of ours to add
    }
    g_previous = current;
    g_target.store(target);
    g_fired.store(false);
    g_cancel.store(cancel);
    struct sigaction ours {};
    ours.sa_sigaction = &on_sigint;
    ours.sa_flags = SA_SIGINFO | (current.sa_flags & SA_ONSTACK);
    sigemptyset(&ours.sa_mask);
    if (sigaction(SIGINT, &ours, nullptr) != 0) {
        g_cancel.store(nullptr);
        return;
    }
    installed_ = true;
}

InterruptScope::~InterruptScope() {
    if (!installed_) {
        return;
    }
    sigaction(SIGINT, &g_previous, nullptr);
    g_cancel.store(nullptr);
    g_target.store(nullptr);
}

void InterruptScope::raise_if_interrupted() const {
    if (installed_ && g_fired.load() && PyErr_CheckSignals() != 0) {
        throw py::error_already_set();
    }
}

}  // namespace llava_kv::bindings
