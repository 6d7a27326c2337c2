"""Runs inside the llama-cpp-python venv: captions images one after the other with its multimodal
chat handler (it has no batch API), REPEATS times; prints the wall seconds of each pass as JSON.

Usage: peer_batch.py MODEL MMPROJ PROMPT MAX_TOKENS REPEATS N_GPU_LAYERS IMAGE.png..."""
import base64
import json
import statistics
import sys
import time

from llama_cpp import Llama
from llama_cpp.llama_chat_format import Llava15ChatHandler

from peer_settings import llama_kwargs, settings  # benchmarks/peers/, this script's folder: same settings as ours

model, mmproj, prompt, max_tokens, repeats, n_gpu_layers = sys.argv[1:7]
images = sys.argv[7:]
llm = Llama(model_path=model, chat_handler=Llava15ChatHandler(clip_model_path=mmproj, verbose=False),
            **llama_kwargs(2048, n_gpu_layers))


def caption(path):
    # like a user of the peer: read the file, pass it as a data URI
    uri = "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()
    r = llm.create_chat_completion(
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                               {"type": "text", "text": prompt}]}],
        max_tokens=int(max_tokens), temperature=0.0, repeat_penalty=1.0)
    return r["usage"]["completion_tokens"]


caption(images[0])  # warm-up
walls, tokens = [], []
for _ in range(int(repeats)):
    t0 = time.perf_counter()
    tokens = [caption(p) for p in images]
    walls.append(time.perf_counter() - t0)
used = settings(llm)
llm.close()
print(json.dumps({"wall_s": walls, "tokens_per_image": statistics.mean(tokens), "settings": used}))
