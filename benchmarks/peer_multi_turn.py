"""Runs inside the llama-cpp-python venv: turns of a chat with one image through its multimodal
chat handler, ``REPEATS`` whole conversations; prints the per-turn seconds of each as JSON.

Usage: peer_multi_turn.py MODEL MMPROJ IMAGE.png TURNS MAX_TOKENS N_CTX [REPEATS [N_GPU_LAYERS]]"""
import base64
import json
import os
import sys
import time

from llama_cpp import Llama
from llama_cpp.llama_chat_format import Llava15ChatHandler

THREADS = int(os.environ.get("LLAVA_KV_BENCH_THREADS") or os.cpu_count() or 1)  # as llava-kv: one per core

model, mmproj, image, turns, max_tokens, n_ctx = sys.argv[1:7]
repeats = int(sys.argv[7]) if len(sys.argv) > 7 else 1
n_gpu_layers = int(sys.argv[8]) if len(sys.argv) > 8 else 0
uri = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
llm = Llama(model_path=model, chat_handler=Llava15ChatHandler(clip_model_path=mmproj, verbose=False),
            n_ctx=int(n_ctx), n_batch=512, n_gpu_layers=n_gpu_layers, n_threads=THREADS,
            n_threads_batch=THREADS, verbose=False, seed=0)
runs = []
for _ in range(repeats):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                             {"type": "text", "text": "What is in this picture?"}]}]
    times = []
    for turn in range(int(turns)):
        t0 = time.perf_counter()
        r = llm.create_chat_completion(messages=messages, max_tokens=int(max_tokens), temperature=0.0,
                                       repeat_penalty=1.0)
        times.append(time.perf_counter() - t0)
        messages += [{"role": "assistant", "content": r["choices"][0]["message"]["content"]},
                     {"role": "user", "content": f"Tell me more about part {turn + 1} of it."}]
    runs.append(times)
llm.close()
print(json.dumps({"runs": runs, "turn_seconds": runs[0]}))
