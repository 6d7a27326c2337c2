#include "device_limits.h"

#include <algorithm>
#include <cstdio>
#include <memory>

namespace llava_kv {

bool device_takes(ggml_backend_dev_t dev, ggml_type type, int64_t ne0, int64_t ne1) {
    ggml_init_params params = {ggml_tensor_overhead() * 8, nullptr, true};
    std::unique_ptr<ggml_context, decltype(&ggml_free)> ctx(ggml_init(params), &ggml_free);
    const auto product = [&](int64_t rows) {
        ggml_tensor * w = ggml_new_tensor_2d(ctx.get(), type, ne0, rows);
        ggml_tensor * x = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_F32, ne0, 1);
        return ggml_mul_mat(ctx.get(), w, x);
    };
    const int64_t small_rows = std::min<int64_t>(ne1, 32);
    return !ggml_backend_dev_supports_op(dev, product(small_rows)) || ggml_backend_dev_supports_op(dev, product(ne1));
}

std::string human_bytes(double bytes) {
    char text[48];
    if (bytes < double(1 << 20)) {
        std::snprintf(text, sizeof(text), "%.0f bytes", bytes);
    } else if (bytes >= double(1ull << 30)) {
        std::snprintf(text, sizeof(text), "%.2f GiB", bytes / double(1ull << 30));
    } else {
        std::snprintf(text, sizeof(text), "%.1f MiB", bytes / double(1 << 20));
    }
    return text;
}

}  // namespace llava_kv
