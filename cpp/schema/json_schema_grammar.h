// JSON Schema -> GBNF, with llama.cpp's converter (its common/ library, of which the build compiles
// only the converter and what it needs).
#pragma once

#include <string>

namespace llava_kv {

// The GBNF grammar (root rule "root") whose strings are the JSON texts `schema_json` (a JSON Schema,
// as JSON text) accepts. Throws std::invalid_argument for text that is not JSON, a schema the
// converter rejects, or one it could only express more loosely than written (a regex pattern it
// cannot translate, which it would otherwise replace by "any string"), naming what is wrong.
std::string json_schema_grammar(const std::string & schema_json);

}  // namespace llava_kv
