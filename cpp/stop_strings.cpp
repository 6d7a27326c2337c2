#include "stop_strings.h"

#include <algorithm>
#include <stdexcept>

#include "tokens.h"

namespace llava_kv {

StopStrings::StopStrings(std::vector<std::string> stops) : stops_(std::move(stops)) {
    for (const auto & s : stops_) {
        if (s.empty()) {
            throw std::invalid_argument("stop strings must not be empty");
        }
        longest_ = std::max(longest_, s.size());
    }
}

bool StopStrings::feed(const std::string & piece) {
    if (stopped_) {
        return true;
    }
    const size_t before = text_.size();
    text_ += piece;
    // A match must end in the new piece: start looking where one could have begun.
    const size_t from = before >= longest_ ? before - longest_ + 1 : 0;
    size_t cut = std::string::npos;
    for (const auto & s : stops_) {
        cut = std::min(cut, text_.find(s, from));
    }
    if (cut != std::string::npos) {
        text_.resize(cut);
        stopped_ = true;
    }
    return stopped_;
}

size_t StopStrings::safe_size() const {
    if (stopped_) {
        return text_.size();
    }
    const size_t hold = longest_ > 0 ? longest_ - 1 : 0;
    const size_t end = text_.size() > hold ? text_.size() - hold : 0;
    return complete_utf8_prefix(text_.substr(0, end));
}

StopStrings::Mark StopStrings::mark() const {
    // A later match is cut at most longest_ - 1 bytes before the text's end at this mark.
    const size_t keep = std::min(text_.size(), longest_);
    return Mark{text_.size(), text_.substr(text_.size() - keep), stopped_};
}

void StopStrings::rewind(const Mark & m) {
    text_.resize(m.size - m.tail.size());
    text_ += m.tail;
    stopped_ = m.stopped;
}

}  // namespace llava_kv
