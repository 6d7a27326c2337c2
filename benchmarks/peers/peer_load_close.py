"""Runs inside the llama-cpp-python venv: CYCLES times load the model and projector
(``Llama`` + ``Llava15ChatHandler``), answer one image prompt with one token, ``close()``; after
each close (and a garbage collection), the process RSS (after malloc_trim(0)) and, with NVML, the
GPU memory in use. Prints JSON.

Usage: peer_load_close.py MODEL MMPROJ IMAGE.png CYCLES N_GPU_LAYERS"""
import base64
import gc
import json
import sys
import time

from llama_cpp import Llama
from llama_cpp.llama_chat_format import Llava15ChatHandler

from memory_probe import gpu_used_bytes, rss_bytes  # benchmarks/peers/, this script's folder

from peer_settings import llama_kwargs, settings  # benchmarks/peers/, this script's folder: same settings as ours

model, mmproj, image, cycles, n_gpu_layers = sys.argv[1:6]
uri = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
baseline = {"rss": rss_bytes(), "gpu": gpu_used_bytes()}
rss, gpu, seconds = [], [], []
for _ in range(int(cycles)):
    t0 = time.perf_counter()
    llm = Llama(model_path=model, chat_handler=Llava15ChatHandler(clip_model_path=mmproj, verbose=False),
                **llama_kwargs(1024, n_gpu_layers))
    llm.create_chat_completion(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "What is in this picture?"}]}],
        max_tokens=1, temperature=0.0)
    used = settings(llm)
    llm.close()
    del llm
    gc.collect()
    seconds.append(time.perf_counter() - t0)
    rss.append(rss_bytes())
    gpu.append(gpu_used_bytes())
print(json.dumps({"baseline": baseline, "rss_bytes": rss, "gpu_bytes": gpu if gpu[0] is not None else None,
                  "seconds": seconds, "settings": used}))
