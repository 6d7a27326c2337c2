// What a chunk of a timeline holds: text tokens, or media (an image or an audio clip).
#pragma once

namespace llava_kv {

enum class ChunkKind { Text, Image, Audio };

inline bool is_media(ChunkKind kind) { return kind != ChunkKind::Text; }

}  // namespace llava_kv
