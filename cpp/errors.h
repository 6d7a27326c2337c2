// Typed errors of the core. The bindings map each to its Python class (llava_kv.errors).
#pragma once

#include <stdexcept>
#include <string>

namespace llava_kv {

// Base of everything the core raises on purpose (Python: LlavaKVError).
struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A GGUF that cannot be loaded: corrupt, incompatible, or a projector that does not fit the model.
struct ModelLoadError : Error {
    using Error::Error;
};

// A media input that cannot be read, preprocessed or encoded by the projector. Thrown as one of the
// two kinds below so a caller can tell which input failed; catching this catches both.
struct MediaError : Error {
    using Error::Error;
};

// An image that cannot be decoded, preprocessed or encoded by the projector.
struct ImageError : MediaError {
    using MediaError::MediaError;
};

// An audio clip that cannot be decoded, preprocessed or encoded by the projector.
struct AudioError : MediaError {
    using MediaError::MediaError;
};

// An edit or prompt that needs more KV positions than the context holds.
struct ContextFullError : Error {
    ContextFullError(long long needed, long long available, const std::string & what)
        : Error(what), needed(needed), available(available) {}
    long long needed;
    long long available;
};

// Use of a model or session after close().
struct ClosedError : Error {
    using Error::Error;
};

// A long call stopped by cancel() or an interrupt.
struct CancelledError : Error {
    using Error::Error;
};

// Constrained generation that cannot go on: the grammar (or JSON schema) allows no token of the
// vocabulary at this point (Python: GrammarError).
struct GrammarError : Error {
    using Error::Error;
};

// A reference (image, chunk) that is no longer part of the session (Python: KeyError).
struct NotFoundError : std::out_of_range {
    using std::out_of_range::out_of_range;
};

}  // namespace llava_kv
