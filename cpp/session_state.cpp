#include "session_state.h"

#include <cstring>

#include "errors.h"

namespace llava_kv {
namespace {

// Version 04 adds what the state was written with (StateHeader); 03 the first approximate chunk
// (blend edits); 02 (always exact) and 03 are still read.
constexpr char kMagic[8] = {'L', 'L', 'K', 'V', 'S', 'T', '0', '4'};

// The format version of a blob whose magic was checked: 2, 3 or 4.
int version_of(const std::string & blob) { return (blob[6] - '0') * 10 + (blob[7] - '0'); }

constexpr size_t kPreamble = sizeof(kMagic) + 2 * sizeof(uint64_t);  // magic, payload size, checksum

// An integrity check against corrupted files (not an authenticity check): every step is a
// bijection of the running value, so any change of one 8-byte word changes the result.
uint64_t checksum64(const char * data, size_t n) {
    constexpr uint64_t k1 = 0x9E3779B97F4A7C15ull;
    constexpr uint64_t k2 = 0xC2B2AE3D27D4EB4Full;
    uint64_t h = k1 ^ static_cast<uint64_t>(n);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w = 0;
        std::memcpy(&w, data + i, 8);
        h ^= w * k2;
        h = ((h << 31) | (h >> 33)) * k1;
    }
    uint64_t tail = 0;
    std::memcpy(&tail, data + i, n - i);
    h ^= tail * k2;
    h ^= h >> 29;
    h *= k1;
    return h ^ (h >> 32);
}


class Writer {
  public:
    template <typename T>
    void pod(const T & v) {
        out.append(reinterpret_cast<const char *>(&v), sizeof(T));
    }
    void bytes(const void * data, size_t n) {
        pod<uint64_t>(n);
        out.append(static_cast<const char *>(data), n);
    }
    void str(const std::string & s) { bytes(s.data(), s.size()); }
    template <typename T>
    void vec(const std::vector<T> & v) {
        bytes(v.data(), v.size() * sizeof(T));
    }
    std::string out;
};

class Reader {
  public:
    explicit Reader(const std::string & in) : in_(in) {}
    template <typename T>
    T pod() {
        need(sizeof(T));
        T v;
        std::memcpy(&v, in_.data() + pos_, sizeof(T));
        pos_ += sizeof(T);
        return v;
    }
    std::string str() {
        const uint64_t n = pod<uint64_t>();
        need(n);
        std::string s = in_.substr(pos_, n);
        pos_ += n;
        return s;
    }
    template <typename T>
    std::vector<T> vec() {
        const uint64_t n = pod<uint64_t>();
        need(n);
        if (n % sizeof(T) != 0) {
            throw Error("corrupt session state: misaligned array");
        }
        std::vector<T> v(n / sizeof(T));
        std::memcpy(v.data(), in_.data() + pos_, n);
        pos_ += n;
        return v;
    }
    bool done() const { return pos_ == in_.size(); }
    void skip(size_t n) {
        need(n);
        pos_ += n;
    }

  private:
    void need(uint64_t n) const {
        if (n > in_.size() - pos_) {
            throw Error("corrupt session state: truncated");
        }
    }
    const std::string & in_;
    size_t pos_ = 0;
};

}  // namespace

std::string serialize_state(const StateHeader & header, const RegistrySnapshot & snap, const std::string & kv_state) {
    Writer w;
    w.out.append(kMagic, sizeof(kMagic));
    w.pod<uint64_t>(0);  // payload size and checksum, filled in below
    w.pod<uint64_t>(0);
    w.pod<uint32_t>(header.n_ctx);
    w.pod<uint32_t>(header.n_batch);
    w.pod<uint32_t>(header.n_ubatch);
    w.pod<uint32_t>(header.n_cells);
    w.pod<uint32_t>(header.n_vocab);
    w.pod<uint32_t>(header.n_embd_inp);
    w.str(header.llama_cpp_commit);
    w.str(header.kv_type);
    w.str(header.placement);
    w.str(header.cpu_variant);
    w.pod<uint64_t>(snap.next_id);
    w.pod<uint64_t>(snap.timeline.size());
    for (const Chunk & c : snap.timeline) {
        w.pod<uint64_t>(c.id);
        w.pod<uint8_t>(is_media(c.kind) ? 1 : 0);
        w.pod<uint8_t>(c.generated ? (c.per_token ? 2 : 1) : 0);  // 2: decoded one token per call
        w.str(c.source);
        if (c.kind == ChunkKind::Text) {
            w.vec(c.tokens);
            continue;
        }
        const MediaEmbedding & img = *c.media;
        w.str(img.digest);
        w.pod<uint32_t>(img.width);
        w.pod<uint32_t>(img.height);
        w.pod<uint8_t>(img.kind == ChunkKind::Audio ? 1 : 0);
        w.pod<uint64_t>(img.n_samples);
        w.pod<uint64_t>(img.chunks.size());
        for (size_t j = 0; j < img.chunks.size(); ++j) {
            size_t size = 0;
            if (mtmd_input_chunk_save(img.chunks[j].get(), nullptr, 0, &size) != 0) {
                throw Error("could not serialize an image chunk");
            }
            std::string buf(size, '\0');
            if (mtmd_input_chunk_save(img.chunks[j].get(), buf.data(), buf.size(), &size) != 0) {
                throw Error("could not serialize an image chunk");
            }
            w.str(buf);
            w.vec(img.embeddings[j]);
        }
    }
    w.pod<uint8_t>(snap.has_logits ? 1 : 0);
    w.vec(snap.logits);
    w.pod<int64_t>(snap.approx_from);
    w.str(kv_state);
    return reseal_state(std::move(w.out));
}

std::string reseal_state(std::string blob) {
    if (blob.size() < kPreamble) {
        throw Error("not a llava-kv session state (too short)");
    }
    const uint64_t size = blob.size() - kPreamble;
    const uint64_t sum = checksum64(blob.data() + kPreamble, size);
    std::memcpy(blob.data() + sizeof(kMagic), &size, sizeof(size));
    std::memcpy(blob.data() + sizeof(kMagic) + sizeof(size), &sum, sizeof(sum));
    return blob;
}

namespace {

// Reads the header of a blob whose preamble was checked, leaving `r` after it.
StateHeader read_header(Reader & r, int version) {
    StateHeader h;
    h.n_ctx = r.pod<uint32_t>();
    h.n_batch = r.pod<uint32_t>();
    h.n_ubatch = r.pod<uint32_t>();
    h.n_cells = r.pod<uint32_t>();
    h.n_vocab = r.pod<uint32_t>();
    h.n_embd_inp = r.pod<uint32_t>();
    if (version >= 4) {
        h.llama_cpp_commit = r.str();
        h.kv_type = r.str();
        h.placement = r.str();
        h.cpu_variant = r.str();
    }
    return h;
}

}  // namespace

std::string provenance_difference(const StateHeader & saved, const StateHeader & here) {
    if (saved.llama_cpp_commit.empty()) {
        return "it was saved in an older format that does not record what wrote it";
    }
    std::string out;
    const auto differs = [&](const char * what, const std::string & a, const std::string & b) {
        if (a != b) {
            out += std::string(out.empty() ? "" : "; ") + what + " " + a + " (now " + b + ")";
        }
    };
    differs("it was written by llama.cpp", saved.llama_cpp_commit.substr(0, 12), here.llama_cpp_commit.substr(0, 12));
    differs("with its layers on", saved.placement, here.placement);
    differs("with the CPU kernels", saved.cpu_variant, here.cpu_variant);
    return out;
}

StateHeader inspect_state(const std::string & blob) {
    if (blob.size() < sizeof(kMagic) || std::memcmp(blob.data(), kMagic, 6) != 0) {
        throw Error("not a llava-kv session state (bad magic)");
    }
    const std::string version = blob.substr(6, 2);
    if (version != "02" && version != "03" && version != "04") {
        throw Error("session state format version '" + version + "' is not one this llava-kv reads (02 to " +
                    std::string(kMagic + 6, 2) + "); save the session again with this version");
    }
    Reader r(blob);
    r.skip(sizeof(kMagic));
    const uint64_t size = r.pod<uint64_t>();
    const uint64_t sum = r.pod<uint64_t>();
    if (size != blob.size() - kPreamble) {
        throw Error("corrupt session state: it declares " + std::to_string(size) + " bytes of data but holds " +
                    std::to_string(blob.size() - kPreamble) + " (truncated or appended to)");
    }
    if (checksum64(blob.data() + kPreamble, size) != sum) {
        throw Error("corrupt session state: checksum mismatch (the file was changed or damaged after it was saved)");
    }
    return read_header(r, version_of(blob));
}

RegistrySnapshot deserialize_state(const std::string & blob, StateHeader & header, std::string & kv_state) {
    header = inspect_state(blob);
    const int version = version_of(blob);
    Reader r(blob);
    r.skip(kPreamble);
    read_header(r, version);
    RegistrySnapshot snap;
    snap.next_id = r.pod<uint64_t>();
    const uint64_t n = r.pod<uint64_t>();
    if (n > blob.size()) {
        throw Error("corrupt session state: chunk count");
    }
    for (uint64_t i = 0; i < n; ++i) {
        Chunk c;
        c.id = r.pod<uint64_t>();
        c.kind = r.pod<uint8_t>() ? ChunkKind::Image : ChunkKind::Text;  // Audio: told by the media below
        const uint8_t generated = r.pod<uint8_t>();
        c.generated = generated != 0;
        c.per_token = generated == 2;
        c.source = r.str();
        if (c.kind == ChunkKind::Text) {
            c.tokens = r.vec<llama_token>();
        } else {
            auto img = std::make_shared<MediaEmbedding>();
            img->digest = r.str();
            img->width = r.pod<uint32_t>();
            img->height = r.pod<uint32_t>();
            img->kind = r.pod<uint8_t>() != 0 ? ChunkKind::Audio : ChunkKind::Image;
            c.kind = img->kind;
            img->n_samples = r.pod<uint64_t>();
            const uint64_t n_sub = r.pod<uint64_t>();
            if (n_sub == 0 || n_sub > blob.size()) {
                throw Error("corrupt session state: image chunk count");
            }
            for (uint64_t j = 0; j < n_sub; ++j) {
                const std::string buf = r.str();
                mtmd::input_chunk_ptr chunk(mtmd_input_chunk_load(buf.data(), buf.size()));
                if (!chunk) {
                    throw Error("corrupt session state: unreadable image chunk");
                }
                img->n_tokens += static_cast<int32_t>(mtmd_input_chunk_get_n_tokens(chunk.get()));
                img->n_pos += mtmd_input_chunk_get_n_pos(chunk.get());
                img->chunks.push_back(std::move(chunk));
                img->embeddings.push_back(r.vec<float>());
            }
            c.media = std::move(img);
        }
        snap.timeline.push_back(std::move(c));
    }
    snap.has_logits = r.pod<uint8_t>() != 0;
    snap.logits = r.vec<float>();
    snap.approx_from = version < 3 ? -1 : r.pod<int64_t>();
    if (snap.approx_from < -1 || snap.approx_from >= static_cast<int64_t>(snap.timeline.size())) {
        throw Error("corrupt session state: approximate-chunk index");
    }
    kv_state = r.str();
    if (!r.done()) {
        throw Error("corrupt session state: trailing bytes");
    }
    return snap;
}

}  // namespace llava_kv
