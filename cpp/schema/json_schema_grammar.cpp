#include "json_schema_grammar.h"

#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "json-schema-to-grammar.h"
#include "json.h"

// The three string helpers the converter takes from llama.cpp's common.cpp, which the build does
// not compile (it needs most of llama.cpp's tool stack). Same contracts as declared in common.h.
std::string string_join(const std::vector<std::string> & values, const std::string & separator) {
    std::string out;
    for (size_t i = 0; i < values.size(); ++i) {
        out += (i > 0 ? separator : std::string()) + values[i];
    }
    return out;
}

std::vector<std::string> string_split(const std::string & str, const std::string & delimiter) {
    std::vector<std::string> parts;
    size_t start = 0;
    for (size_t at = str.find(delimiter); at != std::string::npos; at = str.find(delimiter, start)) {
        parts.push_back(str.substr(start, at - start));
        start = at + delimiter.size();
    }
    parts.push_back(str.substr(start));
    return parts;
}

std::string string_repeat(const std::string & str, size_t n) {
    std::string out;
    out.reserve(str.size() * n);
    for (size_t i = 0; i < n; ++i) {
        out += str;
    }
    return out;
}

namespace llava_kv {
namespace {
thread_local std::vector<std::string> t_warnings;
}  // namespace

void note_schema_warning(const char * /*format*/, const char * text) {
    t_warnings.emplace_back(text);
}

std::string json_schema_grammar(const std::string & schema_json) {
    common_json schema;
    try {
        schema = common_json::parse(schema_json);
    } catch (const std::exception & e) {
        throw std::invalid_argument(std::string("json_schema: not JSON: ") + e.what());
    }
    t_warnings.clear();
    std::string grammar;
    try {
        grammar = json_schema_to_grammar(schema, /*force_gbnf=*/true);
    } catch (const std::exception & e) {
        std::string why = e.what();
        const std::string lead = "JSON schema conversion failed:\n";
        if (why.rfind(lead, 0) == 0) {
            why = why.substr(lead.size());
        }
        throw std::invalid_argument("json_schema: llama.cpp's converter rejects it: " + why);
    }
    if (!t_warnings.empty()) {
        std::string why = t_warnings.front();
        t_warnings.clear();
        const std::string tail = ", accepting any string";  // what the converter would have done
        if (why.size() > tail.size() && why.compare(why.size() - tail.size(), tail.size(), tail) == 0) {
            why.resize(why.size() - tail.size());
        }
        throw std::invalid_argument("json_schema: " + why +
                                    ": llama.cpp's converter cannot express it exactly, and a looser grammar would "
                                    "let replies through that the schema rejects");
    }
    return grammar;
}

}  // namespace llava_kv
