// What the core's calls return, as small bound classes with read-only fields (CTranslate2's
// generation_result.cc). Each class lists its fields once: the same list gives the properties,
// as_dict() (where Python needs a dict: stats, JSON) and __repr__. The other binding files return
// these structs and decide nothing about their shape.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "batch_runner.h"
#include "bindings.h"
#include "device_ledger.h"
#include "embedding_cache.h"
#include "image_embed_registry.h"
#include "live_objects.h"
#include "model.h"
#include "runtime.h"
#include "session.h"
#include "reference.h"
#include "session_state.h"

namespace py = pybind11;

namespace llava_kv::bindings {
namespace {

// A bound result class under construction: field() adds a read-only property with its docstring;
// done() adds as_dict() and __repr__ over those fields, in the order they were declared.
template <typename T>
class ResultClass {
  public:
    ResultClass(py::module_ & m, const char * name, const char * doc) : cls_(m, name, doc), name_(name) {}
    ResultClass(const ResultClass &) = delete;
    ResultClass & operator=(const ResultClass &) = delete;

    // A field that is a member of the struct.
    template <typename V>
    ResultClass & field(const char * name, V T::*member, const char * doc) {
        cls_.def_readonly(name, member, doc);
        fields_->push_back({name, [member](const T & r) { return py::cast(r.*member); }});
        return *this;
    }

    // A field read through `get` (a member of a nested struct; the same count under a second name).
    template <typename Get, typename = std::enable_if_t<!std::is_member_object_pointer_v<Get> &&
                                                        std::is_invocable_v<const Get &, const T &>>>
    ResultClass & field(const char * name, Get get, const char * doc) {
        cls_.def_property_readonly(name, get, doc);
        fields_->push_back({name, [get](const T & r) -> py::object {
                                if constexpr (std::is_base_of_v<py::object, decltype(get(r))>) {
                                    return get(r);  // already a Python object (bytes)
                                } else {
                                    return py::cast(get(r));
                                }
                            }});
        return *this;
    }

    // A method beside the fields (py::class_::def's arguments).
    template <typename... A>
    ResultClass & method(A &&... args) {
        cls_.def(std::forward<A>(args)...);
        return *this;
    }

    // The fields by name, and equality with the same class or a dict of them: for a record that
    // callers used to get as a dict.
    ResultClass & mapping() {
        auto fields = fields_;
        cls_.def(
            "__getitem__",
            [fields](const T & r, const std::string & key) -> py::object {
                for (const auto & f : *fields) {
                    if (key == f.name) {
                        return f.get(r);
                    }
                }
                throw py::key_error(key);
            },
            py::arg("key"), "A field by name, as the dict this record used to be.");
        cls_.def(
            "keys",
            [fields](const T &) {
                py::list out;
                for (const auto & f : *fields) {
                    out.append(f.name);
                }
                return out;
            },
            "The field names (so dict(record) and dict(record, field=...) work).");
        cls_.def(
            "__eq__",
            [fields](const T & r, const py::object & other) -> py::object {
                py::dict mine;
                for (const auto & f : *fields) {
                    mine[f.name] = f.get(r);
                }
                if (py::isinstance<T>(other)) {
                    py::dict theirs;
                    for (const auto & f : *fields) {
                        theirs[f.name] = f.get(other.cast<const T &>());
                    }
                    return py::bool_(mine.equal(theirs));
                }
                if (py::isinstance<py::dict>(other)) {
                    return py::bool_(mine.equal(other));
                }
                return py::reinterpret_borrow<py::object>(Py_NotImplemented);
            },
            py::arg("other"), "Equal to a record with the same fields, or to a dict of them.");
        return *this;
    }

    void done() {
        auto fields = fields_;
        cls_.def(
            "as_dict",
            [fields](const T & r) {
                py::dict out;
                for (const auto & f : *fields) {
                    out[f.name] = f.get(r);
                }
                return out;
            },
            "The fields as a dict, in this class's order (for stats and JSON).");
        cls_.def("__repr__", [fields, name = name_](const T & r) {
            std::string out = "<llava_kv." + name;
            for (const auto & f : *fields) {
                out += " " + std::string(f.name) + "=" + py::repr(f.get(r)).template cast<std::string>();
            }
            return out + ">";
        });
    }

  private:
    struct Field {
        const char * name;
        std::function<py::object(const T &)> get;
    };
    py::class_<T> cls_;
    std::string name_;
    std::shared_ptr<std::vector<Field>> fields_ = std::make_shared<std::vector<Field>>();
};

}  // namespace

void register_results(py::module_ & m) {
    ResultClass<DeviceInfo>(m, "Device", "One backend device: the same record in devices(), build_info() and "
                                         "Model.memory().")
        .field("name", &DeviceInfo::name, "ggml's name for it: 'CPU', 'Vulkan0', 'CUDA0'")
        .field("type", &DeviceInfo::type, "'cpu', 'gpu', 'igpu' (integrated) or 'accel' (e.g. BLAS, NPU)")
        .field("description", &DeviceInfo::description, "what the driver calls it")
        .field("free", &DeviceInfo::free,
               "bytes free as the driver reports them (free == total where it cannot tell; on Mesa's lavapipe "
               "the whole machine's, not this process's)")
        .field("total", &DeviceInfo::total, "bytes the device has")
        .field("allocated", &DeviceInfo::allocated,
               "bytes of this process's live ggml buffers on the device (the device ledger)")
        .done();

    ResultClass<LedgerEntry>(m, "LedgerEntry", "Live ggml buffers of one component on one device.")
        .field("device", &LedgerEntry::device, "the device's name")
        .field("component", &LedgerEntry::component,
               "'weights', 'projector', 'kv', 'compute', or 'other' (allocated outside any model call)")
        .field("session_id", &LedgerEntry::session_id,
               "the session of a 'kv'/'compute' entry (0: a pool's or batch runner's context, or none)")
        .field("bytes", &LedgerEntry::bytes, "bytes held")
        .field("buffers", &LedgerEntry::buffers, "how many buffers")
        .done();

    ResultClass<SessionStats>(m, "SessionStats",
                              "Counters of the work a session did since it was opened (media counters count "
                              "audio clips too).")
        .field("tokens_decoded", [](const SessionStats & s) { return s.registry.tokens_decoded; },
               "text and media tokens written into the KV cache")
        .field("text_tokens_decoded", [](const SessionStats & s) { return s.registry.text_tokens_decoded; },
               "text tokens written into the KV cache")
        .field("image_tokens_decoded", [](const SessionStats & s) { return s.registry.image_tokens_decoded; },
               "media tokens written into the KV cache")
        .field("images_decoded", [](const SessionStats & s) { return s.registry.images_decoded; },
               "media chunks written into the KV cache (from their embeddings)")
        .field("images_encoded", [](const SessionStats & s) { return s.encode.images_encoded; },
               "media run through the projector (embedding cache misses encoded)")
        .field("media_encoded", [](const SessionStats & s) { return s.encode.images_encoded; },
               "the same count as images_encoded, under a name that says clips count too")
        .field("embed_cache_hits", [](const SessionStats & s) { return s.encode.embed_cache_hits; },
               "media whose embedding came from the model's cache")
        .field("embed_cache_misses", [](const SessionStats & s) { return s.encode.embed_cache_misses; },
               "media whose embedding was not in the cache")
        .field("batched_encodes", [](const SessionStats & s) { return s.encode.batched_encodes; },
               "projector calls that encoded several media at once")
        .field("tokens_generated", &SessionStats::tokens_generated, "tokens sampled by generation")
        .field("kv_cells_removed", [](const SessionStats & s) { return s.registry.kv_cells_removed; },
               "KV cells edits removed")
        .field("decode_calls", [](const SessionStats & s) { return s.registry.decode_calls; },
               "llama_decode calls made")
        .field("full_redecodes", [](const SessionStats & s) { return s.registry.full_redecodes; },
               "edits decoded from the start because the memory refused a partial removal")
        .field("shift_edits", [](const SessionStats & s) { return s.registry.shift_edits; },
               "removals done by shifting positions (mode='shift')")
        .field("blend_edits", [](const SessionStats & s) { return s.registry.blend_edits; },
               "approximate edits (mode='blend')")
        .field("blend_tokens_kept", [](const SessionStats & s) { return s.registry.blend_tokens_kept; },
               "KV cells of later chunks blend edits kept instead of decoding")
        .field("batched_steps", &SessionStats::batched_steps,
               "generated tokens decoded in a step shared with other slots of a pool")
        .done();

    ResultClass<TokenLogprob>(m, "TokenLogprob",
                              "A generated token's log-probability under the model (the log-softmax of the logits it "
                              "was drawn from, before the samplers) and the likeliest tokens at its place.")
        .field("token", &TokenLogprob::token, "the token id")
        .field("logprob", &TokenLogprob::logprob, "its log-probability")
        .field("top", &TokenLogprob::top, "(token id, log-probability) pairs, likeliest first, ties by id")
        .done();

    ResultClass<GenerationStep>(m, "GenerationStep",
                                "What a generation call did for one session: one step (generate_step, step_sessions) "
                                "or several (advance, step_until).")
        .field("token", &GenerationStep::token, "the last token accepted (-1: none)")
        .field("text", [](const GenerationStep & s) -> py::object { return py::bytes(s.text); },
               "bytes that became final: whole UTF-8 characters that cannot start a stop string still to come; "
               "everything left once the reply ended")
        .field("n_tokens", &GenerationStep::n_tokens, "tokens accepted by this call")
        .field("done", &GenerationStep::done, "the reply has ended (finish_reason says how)")
        .field("end_of_generation", &GenerationStep::end_of_generation,
               "it ended on an end-of-generation token: reported, not decoded")
        .field("finish_reason", &GenerationStep::finish_reason, "'stop', 'length' or 'error' once done; '' before")
        .field("error", &GenerationStep::error, "'error': why the grammar allowed no token; '' otherwise")
        .field("logprobs", &GenerationStep::logprobs,
               "TokenLogprob entries of the tokens accepted (where the reply was begun with logprobs)")
        .done();

    ResultClass<LiveCounts>(m, "NativeObjects",
                            "Native objects alive in this process (native_objects(); leak checks). Indexable by "
                            "field name and equal to a dict of its fields, as it used to be a dict.")
        .field("models", &LiveCounts::models, "models not yet freed")
        .field("sessions", &LiveCounts::sessions, "sessions not yet freed")
        .field("batch_runners", &LiveCounts::batch_runners, "batch runners not yet freed")
        .mapping()
        .done();

    ResultClass<ReferenceResult>(m, "ReferenceEval",
                                 "What llama.cpp's own path (mtmd_tokenize + mtmd_helper_eval_chunks, a fresh "
                                 "context) gives for one prompt: _testing.reference_eval().")
        .field("tokens", &ReferenceResult::tokens, "text tokens in prompt order, -1 for each media token")
        .field("n_past", &ReferenceResult::n_past, "positions used")
        .field("logits",
               [](const ReferenceResult & r) -> py::object {
                   py::array_t<float> out(static_cast<py::ssize_t>(r.logits.size()));
                   std::copy(r.logits.begin(), r.logits.end(), out.mutable_data());
                   return std::move(out);
               },
               "the last position's logits (float32, n_vocab)")
        .done();

    ResultClass<Branch>(m, "Branch", "One of the replies generate_branches() sampled from one timeline.")
        .field("text", [](const Branch & b) -> py::object { return py::bytes(b.text); },
               "the reply's bytes, cut before a stop string")
        .field("n_tokens", &Branch::n_tokens, "tokens sampled for it")
        .field("finish_reason", &Branch::finish_reason, "'stop', 'length', or 'error' (see error)")
        .field("error", &Branch::error, "why the grammar ended it; '' otherwise")
        .done();

    ResultClass<BatchStats>(m, "BatchStats", "Counters of a batch runner's work.")
        .field("images_encoded", [](const BatchStats & s) { return s.encode.images_encoded; },
               "images run through the projector (embedding cache misses encoded)")
        .field("media_encoded", [](const BatchStats & s) { return s.encode.images_encoded; },
               "the same count as images_encoded, under the name sessions use")
        .field("embed_cache_hits", [](const BatchStats & s) { return s.encode.embed_cache_hits; },
               "images whose embedding came from the model's cache")
        .field("embed_cache_misses", [](const BatchStats & s) { return s.encode.embed_cache_misses; },
               "images whose embedding was not in the cache")
        .field("batched_encodes", [](const BatchStats & s) { return s.encode.batched_encodes; },
               "projector calls that encoded several images at once")
        .field("jobs_submitted", &BatchStats::jobs_submitted, "jobs queued")
        .field("jobs_done", &BatchStats::jobs_done, "jobs that produced a result, failed ones included")
        .field("jobs_failed", &BatchStats::jobs_failed, "jobs whose result carries an error")
        .field("prefix_tokens", &BatchStats::prefix_tokens, "tokens of the shared prompt prefix, decoded once")
        .field("prefix_copies", &BatchStats::prefix_copies, "sequences that started from the shared prefix")
        .field("tokens_decoded", &BatchStats::tokens_decoded, "tokens written into the KV cache")
        .field("tokens_generated", &BatchStats::tokens_generated, "tokens sampled")
        .field("decode_steps", &BatchStats::decode_steps,
               "batched decode calls carrying prompt or generated tokens")
        .field("max_sequences", &BatchStats::max_sequences, "most sequences carried by one decode step")
        .field("n_ctx", &BatchStats::n_ctx, "KV cells of the runner's context (0 until it is created)")
        .field("context_reused", &BatchStats::context_reused,
               "this run found the context and the shared prompt's KV cells from an earlier run")
        .done();

    ResultClass<EmbeddingCacheStats>(m, "EmbeddingCacheStats", "The model's shared embedding cache: use and size.")
        .field("hits", &EmbeddingCacheStats::hits, "lookups that found the embedding")
        .field("misses", &EmbeddingCacheStats::misses, "lookups that did not")
        .field("evictions", &EmbeddingCacheStats::evictions, "entries dropped to stay within the byte budget")
        .field("entries", &EmbeddingCacheStats::entries, "embeddings held now")
        .field("bytes", &EmbeddingCacheStats::bytes, "bytes those hold")
        .field("capacity_bytes", &EmbeddingCacheStats::capacity_bytes, "the byte budget")
        .done();

    ResultClass<BlendReport>(m, "BlendReport", "What one approximate edit (mode='blend') decoded and kept.")
        .field("tokens_decoded", &BlendReport::tokens_decoded, "tokens the edit decoded")
        .field("tokens_kept", &BlendReport::tokens_kept, "KV cells of later chunks kept as they were")
        .field("exact_tokens", &BlendReport::exact_tokens, "tokens the exact edit would have decoded")
        .field("k", &BlendReport::k, "leading tokens of each later image asked to be decoded again")
        .field("k_applied", &BlendReport::k_applied,
               "what the cache allowed of k (0 under M-RoPE, where an image's cells share one position)")
        .field("exact_fallback", &BlendReport::exact_fallback,
               "done as an exact edit: a loaded sliding-window state lacks the cells to keep")
        .done();

    ResultClass<StateHeader>(m, "StateHeader", "The sizes a saved session state was made with, and what wrote it.")
        .field("n_ctx", &StateHeader::n_ctx, "KV cells the session was opened with")
        .field("n_batch", &StateHeader::n_batch, "tokens per decode call")
        .field("n_ubatch", &StateHeader::n_ubatch, "tokens per micro-batch")
        .field("n_cells", &StateHeader::n_cells, "KV cells the saved timeline takes (BOS included)")
        .field("n_vocab", &StateHeader::n_vocab, "the vocabulary size of the model it was saved from")
        .field("n_embd_inp", &StateHeader::n_embd_inp, "the input embedding width of that model")
        .field("llama_cpp_commit", &StateHeader::llama_cpp_commit,
               "the llama.cpp commit of the llava-kv that wrote it ('' before state format 04)")
        .field("kv_type", &StateHeader::kv_type, "its KV cache's element types: 'f16', or K/V ('q8_0/f16')")
        .field("placement", &StateHeader::placement, "where its layers ran ('CPU', 'Vulkan0', 'CUDA0+CPU')")
        .field("cpu_variant", &StateHeader::cpu_variant, "ggml's CPU kernels that computed it ('zen4', 'haswell')")
        .done();

    ResultClass<MemoryEntry>(m, "MemoryEntry", "Bytes one component of a model holds on one device.")
        .field("component", &MemoryEntry::component,
               "'weights', 'projector', 'embedding_cache', or a session's or batch runner's 'kv' / 'compute'")
        .field("device", &MemoryEntry::device, "the device's name ('CPU', 'Vulkan0', 'CUDA0')")
        .field("bytes", &MemoryEntry::bytes, "bytes held")
        .field("session_id", &MemoryEntry::session_id,
               "the session of a 'kv' / 'compute' entry (0: not a session's)")
        .field("batch_id", &MemoryEntry::batch_id,
               "the batch runner of a 'kv' / 'compute' entry (0: not a batch runner's)")
        .done();

    ResultClass<MemoryReport>(m, "MemoryReport", "What a model holds, per component and device, and the devices.")
        .field("entries", &MemoryReport::entries, "bytes per component and device")
        .field("devices", &MemoryReport::devices, "every device with its free and total memory now")
        .done();

    ResultClass<BuildInfo>(m, "BuildInfo", "What this build of the native core is made of.")
        .field("version", &BuildInfo::version, "the llava-kv version")
        .field("llama_cpp_commit", &BuildInfo::llama_cpp_commit, "the llama.cpp commit built against")
        .field("backends", &BuildInfo::backends, "the ggml backends compiled in ('CPU', 'Vulkan', 'CUDA')")
        .field("devices", &BuildInfo::devices, "the devices those backends see now")
        .field("cpu_variant", &BuildInfo::cpu_variant,
               "the CPU backend variant loaded: the best this CPU runs ('zen4', 'haswell', ...), or the one "
               "LLAVA_KV_CPU_VARIANT names; 'host' in a build for its own machine only")
        .field("cpu_variants", &BuildInfo::cpu_variants, "the CPU backend variants this build has")
        .field("cpu_variants_built", &BuildInfo::cpu_variants_built,
               "'all' (every variant, portable) or 'host' (one, built for the build machine)")
        .done();
}

}  // namespace llava_kv::bindings
