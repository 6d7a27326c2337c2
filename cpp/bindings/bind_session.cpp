#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>

#include "bindings.h"
#include "reference.h"
#include "session.h"
#include "session_state.h"
#include "stop_strings.h"

namespace py = pybind11;

namespace llava_kv::bindings {
namespace {

// What step_sessions_until() watches between steps (the server's engine sets it when a request
// arrives or is cancelled).
struct StepSignal {
    std::atomic<bool> flag{false};
};

// One image or audio clip as the core takes it: its array (an HxWx3 uint8 image or 1-D float32
// samples, checked once, here, and referenced for as long as the item lives, so the core can read it
// with the GIL released), its content digest and where it came from.
struct MediaItem {
    py::array array;
    MediaInput input;
    ChunkKind kind = ChunkKind::Image;

    MediaItem(const py::array & given, std::string digest, std::string source) {
        input.digest = std::move(digest);
        input.source = std::move(source);
        // No silent conversions: pixels are uint8, audio samples float32.
        if (given.dtype().is(py::dtype::of<float>()) && given.ndim() == 1) {
            auto samples = py::array_t<float, py::array::c_style>::ensure(given);
            kind = ChunkKind::Audio;
            input.samples = samples.data();
            input.n_samples = static_cast<size_t>(samples.size());
            array = std::move(samples);
        } else if (given.dtype().is(py::dtype::of<uint8_t>()) && given.ndim() == 3 && given.shape(2) == 3) {
            RgbArray pixels = RgbArray::ensure(given);
            kind = ChunkKind::Image;
            input.data = pixels.data();
            input.height = static_cast<uint32_t>(pixels.shape(0));
            input.width = static_cast<uint32_t>(pixels.shape(1));
            array = std::move(pixels);
        } else {
            throw py::value_error("media must be an HxWx3 uint8 array (image) or a 1-D float32 array (audio), got " +
                                  py::str(given.dtype()).cast<std::string>() + " with " +
                                  std::to_string(given.ndim()) + " dimensions");
        }
    }
};

// The chunks of an edit: each item a str (text) or a MediaItem, which stays referenced here while
// the GIL is released and the core reads its array.
struct Inputs {
    std::vector<py::object> items;
    std::vector<ChunkInput> chunks;
};

Inputs convert(const py::list & items) {
    Inputs out;
    out.items.reserve(items.size());
    for (const py::handle & item : items) {
        ChunkInput input;
        if (py::isinstance<py::str>(item)) {
            input.kind = ChunkKind::Text;
            input.text = item.cast<std::string>();
        } else if (py::isinstance<MediaItem>(item)) {
            const auto & media = item.cast<const MediaItem &>();
            input.kind = media.kind;
            input.media = media.input;
            out.items.push_back(py::reinterpret_borrow<py::object>(item));
        } else {
            throw py::type_error("a chunk is a str (text) or a MediaItem, got " +
                                 py::str(py::type::of(item).attr("__name__")).cast<std::string>());
        }
        out.chunks.push_back(std::move(input));
    }
    return out;
}


}  // namespace

void register_session(py::module_ & m) {
    // For tests and selfcheck: what mtmd_tokenize + mtmd_helper_eval_chunks give for one prompt with
    // markers. A test hook, so it lives in _core._testing.
    py::module_ testing = m.attr("_testing").cast<py::module_>();
    testing.def(
        "reference_eval",
        [](Model & model, const std::string & prompt, const py::list & images, int32_t n_ctx, int32_t n_batch) {
            Inputs inputs = convert(images);
            std::vector<MediaInput> pixels;
            for (const auto & c : inputs.chunks) {
                pixels.push_back(c.media);
            }
            return without_gil([&] { return reference_eval(model, prompt, pixels, n_ctx, n_batch); });
        },
        py::arg("model"), py::arg("prompt"), py::arg("images"), py::arg("n_ctx") = 4096, py::arg("n_batch") = 512,
        "The reference evaluation of a prompt with media markers (mtmd_tokenize + mtmd_helper_eval_chunks in a "
        "fresh context): a ReferenceEval.");

    m.def(
        "inspect_state",
        [](const Model & model, const py::bytes & blob) {
            const std::string data = blob;
            return without_gil([&] {
                StateHeader header = inspect_state(data);
                check_state_fits(header, model);
                return header;
            });
        },
        py::arg("model"), py::arg("blob"),
        "Checks a saved session's integrity (checksum) and that it fits `model`; returns the sizes it was saved with.");
    m.def(
        "step_sessions",
        [](const std::vector<std::shared_ptr<Session>> & sessions) {
            return without_gil([&] { return Session::step_together(sessions); });
        },
        py::arg("sessions"),
        "One generation step for slots of one pool in one batched decode: a GenerationStep per session, in "
        "order. All or nothing on failure (a slot whose grammar allows no token ends alone, with its error; a "
        "slot with no free KV cell ends 'length' without taking part).");
    py::class_<StepSignal, std::shared_ptr<StepSignal>>(
        m, "StepSignal", "A flag another thread sets to make step_sessions_until return between two steps.")
        .def(py::init<>(), "A lowered flag.")
        .def("set", [](StepSignal & s) { s.flag.store(true); }, "Ask the loop to return after its current step.")
        .def("clear", [](StepSignal & s) { s.flag.store(false); }, "Lower the flag.")
        .def_property_readonly("is_set", [](const StepSignal & s) { return s.flag.load(); }, "whether it is set");
    m.def(
        "step_sessions_until",
        [](const std::vector<std::shared_ptr<Session>> & sessions, int32_t max_steps, std::vector<bool> streams,
           const std::shared_ptr<StepSignal> & signal) {
            return without_gil([&] {
                return Session::step_until(sessions, max_steps, streams, signal ? &signal->flag : nullptr);
            });
        },
        py::arg("sessions"), py::arg("max_steps"), py::arg("streams") = std::vector<bool>{},
        py::arg("signal") = nullptr,
        "Batched steps of these slots until a reply ends, a slot marked in `streams` has new text, `signal` is set "
        "or max_steps: what each slot did over them. A failed step is undone and raised at once; the steps before "
        "it stay, reported by the next call.");

    py::class_<StopStrings>(m, "StopStrings",
                            "Stop strings over generated text arriving piece by piece (as the batch runner "
                            "applies them): where it first holds one, and how much can be shown already.")
        .def(py::init<std::vector<std::string>>(), py::arg("stops"), "Watch for these stop strings.")
        .def("feed", &StopStrings::feed, py::arg("piece"),
             "Appends bytes; True once the text holds a stop string (it then ends before it).")
        .def_property_readonly("text", [](const StopStrings & s) { return py::bytes(s.text()); },
                               "the text so far, cut before a stop string once one is found")
        .def_property_readonly("stopped", &StopStrings::stopped, "a stop string was found")
        .def_property_readonly("safe_size", &StopStrings::safe_size,
                               "bytes of text that no later piece can turn into a stop string");

    py::enum_<ChunkKind>(m, "ChunkKind", "What a chunk of a timeline holds.")
        .value("TEXT", ChunkKind::Text, "text tokens")
        .value("IMAGE", ChunkKind::Image, "an image")
        .value("AUDIO", ChunkKind::Audio, "an audio clip");

    py::class_<MediaItem>(m, "MediaItem", "An image or audio clip as an edit takes it, its array checked once.")
        .def(py::init<const py::array &, std::string, std::string>(), py::arg("array"), py::arg("digest"),
             py::arg("source"),
             "An HxWx3 uint8 array is an image, a 1-D float32 array an audio clip (anything else: ValueError); "
             "`digest` names its content (the embedding cache's key), `source` where it came from.")
        .def_readonly("array", &MediaItem::array, "the pixels or samples, as given (C-contiguous)")
        .def_readonly("kind", &MediaItem::kind, "ChunkKind.IMAGE or ChunkKind.AUDIO")
        .def_property_readonly("digest", [](const MediaItem & m) { return m.input.digest; }, "content digest")
        .def_property_readonly("source", [](const MediaItem & m) { return utf8(m.input.source); },
                               "the path or description it came as");

    py::class_<ChunkInfo>(m, "ChunkInfo", "One chunk of a session's timeline: text tokens, an image or an audio clip.")
        .def_readonly("id", &ChunkInfo::id, "stable id of the chunk within its session")
        .def_readonly("kind", &ChunkInfo::kind, "ChunkKind.TEXT, IMAGE or AUDIO")
        .def_readonly("n_tokens", &ChunkInfo::n_tokens, "KV cells the chunk takes (the first chunk's include BOS)")
        .def_readonly("pos0", &ChunkInfo::pos0, "first KV position")
        .def_readonly("pos1", &ChunkInfo::pos1, "one past the last KV position (fewer than cells under M-RoPE)")
        .def_readonly("digest", &ChunkInfo::digest, "content digest of an image or clip ('' for text)")
        .def_property_readonly("source", [](const ChunkInfo & c) { return utf8(c.source); },
                               "the text of a text chunk; the path or description an image or clip came as")
        .def_readonly("width", &ChunkInfo::width, "image width in pixels (0 otherwise)")
        .def_readonly("height", &ChunkInfo::height, "image height in pixels (0 otherwise)")
        .def_readonly("n_samples", &ChunkInfo::n_samples, "audio samples (0 otherwise)")
        .def_readonly("tokens", &ChunkInfo::tokens, "token ids of a text chunk, BOS excluded (empty otherwise)")
        .def_readonly("generated", &ChunkInfo::generated, "tokens the model sampled, not text given to it");

    py::class_<Session, std::shared_ptr<Session>>(m, "Session",
                                                 "One conversation: a context, its timeline of text and media kept "
                                                 "in step with the KV cache, and a sampler. One call at a time.")
        .def("close", released(&Session::close),
             "Free the context; a call in flight stops at its next decode step (ClosedError).")
        .def_property_readonly("closed", &Session::closed, "close() has run")
        .def_property_readonly("closing", &Session::closing,
                               "close() has begun: a call in flight stops at its next decode step")
        .def_property_readonly("id", &Session::id, "process-unique id (memory reports name sessions by it)")
        .def(
            "splice",
            [](Session & s, size_t begin, size_t end, const py::list & items) {
                Inputs inputs = convert(items);
                return interruptible(s, [&] { return s.splice(begin, end, inputs.chunks); });
            },
            py::arg("begin"), py::arg("end"), py::arg("items"),
            "Replace chunks [begin, end) with items (str: text; (array, digest, source): media) by an exact edit; "
            "returns the new chunks' ids. Nothing changes on failure.")
        .def(
            "splice_blend",
            [](Session & s, size_t begin, size_t end, const py::list & items, int32_t k, bool allow_drift) {
                Inputs inputs = convert(items);
                BlendReport report;
                std::vector<uint64_t> ids = interruptible(
                    s, [&] { return s.splice_blend(begin, end, inputs.chunks, k, allow_drift, report); });
                return std::make_pair(std::move(ids), report);
            },
            py::arg("begin"), py::arg("end"), py::arg("items"), py::arg("k"), py::arg("allow_drift") = false,
            "The approximate splice (mode='blend'): (new chunk ids, what it decoded and kept).")
        .def_property_readonly("exact", py::cpp_function(released(&Session::exact)),
                               "whether every KV cell is what a fresh run computes")
        .def(
            "recompute", [](Session & s) { return interruptible(s, [&] { return s.recompute(); }); },
            "Decode again from the first approximate chunk (exact afterwards); returns the tokens decoded.")
        .def(
            "remove_shift",
            [](Session & s, uint64_t chunk_id) { interruptible(s, [&] { s.remove_shift(chunk_id); }); },
            py::arg("chunk_id"),
            "Remove a chunk by shifting later positions down, without decoding (approximate; mode='shift').")
        .def(
            "remove_chunks",
            [](Session & s, const std::vector<uint64_t> & chunk_ids) {
                interruptible(s, [&] { s.remove_chunks(chunk_ids); });
            },
            py::arg("chunk_ids"), "Remove these chunks in one exact edit.")
        .def("index_of", released(&Session::index_of), py::arg("chunk_id"),
             "Position of the chunk in the timeline; KeyError if it is gone.")
        .def("clear", released(&Session::clear), "Empty the timeline and the KV cache.")
        .def("cancel", &Session::cancel, "Stop the call in flight (CancelledError, nothing changes); safe from any thread.")
        .def("timeline",
             [](const Session & s) {
                 std::vector<ChunkInfo> timeline = without_gil([&] { return s.timeline(); });
                 return timeline;
             },
             "The chunks of the timeline, in order.")
        .def("logits",
             [](const Session & s) {
                 std::vector<float> logits = without_gil([&] { return s.logits(); });
                 py::array_t<float> out(static_cast<py::ssize_t>(logits.size()));
                 std::copy(logits.begin(), logits.end(), out.mutable_data());
                 return out;
             },
             "The logits (float32, n_vocab) after the last token of the timeline.")
        .def_property_readonly("n_past", py::cpp_function(released(&Session::n_past)),
                               "the next KV position (fewer than cells used under M-RoPE)")
        .def_property_readonly("n_cells", py::cpp_function(released(&Session::n_cells)),
                               "KV cells the timeline takes")
        .def_property_readonly("n_ctx", &Session::n_ctx, "KV cells edits are checked against (as asked for)")
        .def_property_readonly("n_batch", [](const Session & s) { return s.params().n_batch; },
                               "tokens per decode call (as the context really takes them)")
        .def_property_readonly("n_ubatch", [](const Session & s) { return s.params().n_ubatch; },
                               "tokens per micro-batch")
        .def_property_readonly("slot", &Session::slot, "this session's sequence in its pool's context (0 alone)")
        .def_property_readonly("n_slots", &Session::n_slots, "sessions sharing this session's context (1 alone)")
        .def_property_readonly("seed", [](const Session & s) { return s.params().seed; },
                               "the seed the session was opened with (model.session(seed=...))")
        .def("tokenize", released(&Session::tokenize), py::arg("text"), py::arg("add_special") = false,
             "The model's tokens for text (add_special: BOS and the like, as the model's metadata says).")
        .def(
            "begin_generation",
            [](Session & s, const SamplingParams & p, int32_t max_tokens, std::vector<std::string> stop,
               int32_t logprobs) {
                ReplyParams r;
                r.sampling = p;
                r.max_tokens = max_tokens;
                r.stops = std::move(stop);
                r.top_logprobs = logprobs;
                without_gil([&] { s.begin_generation(r); });
            },
            py::arg("sampling"), py::arg("max_tokens") = INT32_MAX, py::arg("stop") = std::vector<std::string>{},
            py::arg("logprobs") = -1,
            "Start a reply with these settings, token limit, stop strings and log-probabilities (-1: none; 0-20: "
            "each token's, with that many alternatives); generate_step/advance/step_sessions continue it.")
        .def(
            "generate_branches",
            [](Session & s, int32_t n, const SamplingParams & p, int32_t max_tokens, std::vector<std::string> stops) {
                return interruptible(s, [&] { return s.generate_branches(n, p, max_tokens, stops); });
            },
            py::arg("n"), py::arg("sampling"), py::arg("max_tokens"), py::arg("stops") = std::vector<std::string>{},
            "n replies sampled together from the timeline (seeds sampling.seed + i); the session is left as it was.")
        .def("generate_step",
             [](Session & s) {
                 return interruptible(s, [&] { return s.generate_step(); });
             },
             "Draw one token and decode it into the timeline: a GenerationStep.")
        .def(
            "advance",
            [](Session & s, int32_t max_steps, bool until_text) {
                return interruptible(s, [&] { return s.advance(max_steps, until_text); });
            },
            py::arg("max_steps"), py::arg("until_text") = false,
            "Up to max_steps generation steps in one call (until the reply ends; with until_text, until some text "
            "became final): what they did, as one GenerationStep. A cancel() stops it after the steps done.")
        .def("save_state",
             [](const Session & s) {
                 std::string blob = without_gil([&] { return s.save_state(); });
                 return py::bytes(blob);
             },
             "The session (timeline, logits, KV cache of its sequence) as a checksummed blob.")
        .def("load_state",
             [](Session & s, const py::bytes & blob, bool allow_drift) {
                 std::string data = blob;
                 interruptible(s, [&] { s.load_state(data, allow_drift); });
             },
             py::arg("blob"), py::arg("allow_drift") = false,
             "Replace the session's state with a saved one (checked first; nothing changes on failure). A state "
             "written by another llama.cpp, placement or CPU kernels is refused unless allow_drift (then the "
             "session is approximate until recompute()).")
        .def("flush_generation",
             [](Session & s) {
                 std::string rest = without_gil([&] { return s.flush_generation(); });
                 return py::bytes(rest);
             },
             "End the reply: the text bytes it still held back (an incomplete UTF-8 character, a stop string's "
             "prefix).")
        .def("detokenize",
             [](const Session & s, const std::vector<llama_token> & tokens) {
                 std::string text = without_gil([&] { return s.detokenize(tokens); });
                 return py::bytes(text);
             },
             py::arg("tokens"), "The text bytes of these tokens.")
        .def("stats", [](const Session & s) { return without_gil([&] { return s.stats(); }); },
             "Counters of the work the session did since it was opened.");
}

}  // namespace llava_kv::bindings
