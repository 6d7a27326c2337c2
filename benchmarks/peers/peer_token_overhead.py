"""Runs inside the llama-cpp-python venv: per-token generation cost of its streaming chat
completion on one image prompt: (time of the last chunk - time of the first) / (chunks - 1), so the
prompt (which every call re-does: the handler resets the context) is left out; medians over REPEATS.

Usage: peer_token_overhead.py MODEL MMPROJ IMAGE.png PROMPT N_TOKENS REPEATS N_GPU_LAYERS"""
import base64
import json
import statistics
import sys
import time

from llama_cpp import Llama
from llama_cpp.llama_chat_format import Llava15ChatHandler

from peer_settings import llama_kwargs, settings  # benchmarks/peers/, this script's folder: same settings as ours

model, mmproj, image, prompt, n_tokens, repeats, n_gpu_layers = sys.argv[1:8]
uri = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
llm = Llama(model_path=model, chat_handler=Llava15ChatHandler(clip_model_path=mmproj, verbose=False),
            **llama_kwargs(2048, n_gpu_layers))
messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": prompt}]}]


def call():
    """Seconds per streamed chunk after the first, and the number of chunks with text."""
    stamps = []
    for chunk in llm.create_chat_completion(messages=messages, max_tokens=int(n_tokens), temperature=0.0,
                                            repeat_penalty=1.0, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            stamps.append(time.perf_counter())
    if len(stamps) < 2:
        return None, len(stamps)
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1), len(stamps)


call()  # warm-up
per_token, tokens = [], 0
for _ in range(int(repeats)):
    seconds, tokens = call()
    if seconds is not None:
        per_token.append(seconds)
used = settings(llm)
llm.close()
print(json.dumps({"per_token_s": statistics.median(per_token) if per_token else None,
                  "all_per_token_s": per_token, "tokens": tokens, "settings": used}))
