// llama.cpp's common/json-schema-to-grammar.cpp compiled as part of llava-kv. It prints its one
// warning (a regex pattern it cannot translate, which it replaces by "any string") to stderr; here
// that print is routed to note_schema_warning() so json_schema_grammar() can refuse the schema
// instead of sampling from a looser grammar. The headers it uses come first, so the macro below
// reaches only the converter's own code.
#include <algorithm>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "common.h"
#include "json-schema-to-grammar.h"
#include "trie.h"
#include "unicode.h"

namespace llava_kv {
void note_schema_warning(const char * format, const char * text);
}

#define fprintf(stream, format, ...) llava_kv::note_schema_warning(format, __VA_ARGS__)
#include "json-schema-to-grammar.cpp"
#undef fprintf
