// Stop strings over text that arrives piece by piece (generated tokens), for sessions and the batch
// runner alike: where the text first contains one of them, and how much of it can be shown already
// because no later piece can turn it into a stop string.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace llava_kv {

class StopStrings {
  public:
    // Throws std::invalid_argument for an empty stop string.
    StopStrings() = default;  // no stop strings
    explicit StopStrings(std::vector<std::string> stops);

    // Appends `piece` (bytes). Returns true once the text contains a stop string: text() then ends
    // right before the first one, and later calls change nothing.
    bool feed(const std::string & piece);
    const std::string & text() const { return text_; }
    bool stopped() const { return stopped_; }
    // Bytes of text() that are final: not the start of a stop string still to come, and not inside
    // a UTF-8 character (all of it once stopped).
    size_t safe_size() const;

    // Where the text is now, to go back to after later feed() calls (a failed step): the last bytes
    // a stop string's cut can reach, not the whole text.
    struct Mark {
        size_t size = 0;
        std::string tail;
        bool stopped = false;
    };
    Mark mark() const;
    void rewind(const Mark & m);

  private:
    std::vector<std::string> stops_;
    size_t longest_ = 0;
    std::string text_;
    bool stopped_ = false;
};

}  // namespace llava_kv
