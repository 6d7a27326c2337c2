// What one device can hold, asked before anything is allocated there.
#pragma once

#include <cstdint>
#include <string>

#include "ggml-backend.h"
#include "ggml.h"

namespace llava_kv {

// Whether `dev` can run a graph node that reads a tensor of `type` with rows of `ne0` values, `ne1`
// rows. Backends refuse tensors larger than they can address (Vulkan: maxStorageBufferRange and
// maxBufferSize); a weight or cache tensor placed on such a device anyway makes ggml's scheduler
// abort the process at the first decode. Asked of a matrix product, the commonest use of both, and
// compared with a small tensor of the same type, so that only the size can make the difference.
bool device_takes(ggml_backend_dev_t dev, ggml_type type, int64_t ne0, int64_t ne1);

// Bytes as the messages about device memory say them: "16384 bytes", "12.5 MiB", "3.73 GiB".
std::string human_bytes(double bytes);

}  // namespace llava_kv
