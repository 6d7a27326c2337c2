"""Runs inside the llama-cpp-python venv: turns of a chat with one image through its multimodal
chat handler; prints per-turn seconds as JSON. Usage: peer_multi_turn.py MODEL MMPROJ IMAGE.png TURNS MAX_TOKENS N_CTX"""
import base64
import json
import sys
import time

from llama_cpp import Llama
from llama_cpp.llama_chat_format import Llava15ChatHandler

model, mmproj, image, turns, max_tokens, n_ctx = sys.argv[1:7]
uri = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
llm = Llama(model_path=model, chat_handler=Llava15ChatHandler(clip_model_path=mmproj, verbose=False),
            n_ctx=int(n_ctx), n_batch=512, verbose=False, seed=0)
messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": "What is in this picture?"}]}]
times = []
for turn in range(int(turns)):
    t0 = time.perf_counter()
    r = llm.create_chat_completion(messages=messages, max_tokens=int(max_tokens), temperature=0.0)
    times.append(time.perf_counter() - t0)
    messages += [{"role": "assistant", "content": r["choices"][0]["message"]["content"]},
                 {"role": "user", "content": f"Tell me more about part {turn + 1} of it."}]
print(json.dumps({"turn_seconds": times}))
