// A projector GGUF vetted against the text model and the device it is meant for, before mtmd loads it.
#pragma once

#include <cstddef>
#include <map>
#include <string>

#include "llama.h"
#include "mtmd.h"

namespace llava_kv {

// Reads the projector's metadata and tensor table (nothing is allocated on a device) and refuses, with a
// ModelLoadError that names the numbers, a projector whose output width is not the text model's
// input width, or one the device it is meant for could not take: more memory than the device has
// free, or a tensor larger than one buffer there can hold or address. mtmd makes the same width check
// only after its projector buffers are allocated, and its failed constructor never frees them: a
// mismatched projector left its weights behind, in VRAM on a GPU (found by the device ledger).
// Returns the bytes the projector's weights will hold on their device (its compute buffers come at
// the first encode).
std::map<ggml_backend_dev_t, size_t> check_projector(const std::string & path, const llama_model * text_model,
                                                     const mtmd_context_params & params);

}  // namespace llava_kv
