#include "session_state.h"

#include <cstring>

#include "errors.h"

namespace llava_kv {
namespace {

constexpr char kMagic[8] = {'L', 'L', 'K', 'V', 'S', 'T', '0', '1'};

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

std::string serialize_state(const RegistrySnapshot & snap, const std::string & kv_state) {
    Writer w;
    w.out.append(kMagic, sizeof(kMagic));
    w.pod<uint64_t>(snap.next_id);
    w.pod<uint64_t>(snap.timeline.size());
    for (const Chunk & c : snap.timeline) {
        w.pod<uint64_t>(c.id);
        w.pod<uint8_t>(c.kind == ChunkKind::Image ? 1 : 0);
        w.pod<uint8_t>(c.generated ? 1 : 0);
        w.str(c.source);
        if (c.kind == ChunkKind::Text) {
            w.vec(c.tokens);
            continue;
        }
        const ImageEmbedding & img = *c.image;
        w.str(img.digest);
        w.pod<uint32_t>(img.width);
        w.pod<uint32_t>(img.height);
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
    w.str(kv_state);
    return std::move(w.out);
}

RegistrySnapshot deserialize_state(const std::string & blob, std::string & kv_state) {
    if (blob.size() < sizeof(kMagic) || std::memcmp(blob.data(), kMagic, sizeof(kMagic)) != 0) {
        throw Error("not a llava-kv session state (bad magic)");
    }
    Reader r(blob);
    for (size_t i = 0; i < sizeof(kMagic); ++i) {
        r.pod<char>();
    }
    RegistrySnapshot snap;
    snap.next_id = r.pod<uint64_t>();
    const uint64_t n = r.pod<uint64_t>();
    if (n > blob.size()) {
        throw Error("corrupt session state: chunk count");
    }
    for (uint64_t i = 0; i < n; ++i) {
        Chunk c;
        c.id = r.pod<uint64_t>();
        c.kind = r.pod<uint8_t>() ? ChunkKind::Image : ChunkKind::Text;
        c.generated = r.pod<uint8_t>() != 0;
        c.source = r.str();
        if (c.kind == ChunkKind::Text) {
            c.tokens = r.vec<llama_token>();
        } else {
            auto img = std::make_shared<ImageEmbedding>();
            img->digest = r.str();
            img->width = r.pod<uint32_t>();
            img->height = r.pod<uint32_t>();
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
            c.image = std::move(img);
        }
        snap.timeline.push_back(std::move(c));
    }
    snap.has_logits = r.pod<uint8_t>() != 0;
    snap.logits = r.vec<float>();
    kv_state = r.str();
    if (!r.done()) {
        throw Error("corrupt session state: trailing bytes");
    }
    return snap;
}

}  // namespace llava_kv
