"""Runs inside the llama-cpp-python venv: turns of a chat with one image through its multimodal
chat handler: one warm-up conversation (2 turns), then one whole conversation per further image;
prints the per-turn seconds of each as JSON.

Usage: peer_multi_turn.py MODEL MMPROJ TURNS MAX_TOKENS N_CTX N_GPU_LAYERS WARM.png IMAGE.png..."""
import base64
import json
import sys
import time

from llama_cpp import Llama
from llama_cpp.llama_chat_format import Llava15ChatHandler

from peer_settings import llama_kwargs, settings  # benchmarks/peers/, this script's folder: same settings as ours

model, mmproj, turns, max_tokens, n_ctx, n_gpu_layers = sys.argv[1:7]
images = sys.argv[7:]
llm = Llama(model_path=model, chat_handler=Llava15ChatHandler(clip_model_path=mmproj, verbose=False),
            **llama_kwargs(n_ctx, n_gpu_layers))


def conversation(image, n_turns):
    uri = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                             {"type": "text", "text": "What is in this picture?"}]}]
    times = []
    for turn in range(n_turns):
        t0 = time.perf_counter()
        r = llm.create_chat_completion(messages=messages, max_tokens=int(max_tokens), temperature=0.0,
                                       repeat_penalty=1.0)
        times.append(time.perf_counter() - t0)
        messages += [{"role": "assistant", "content": r["choices"][0]["message"]["content"]},
                     {"role": "user", "content": f"Tell me more about part {turn + 1} of it."}]
    return times


conversation(images[0], 2)  # warm-up
runs = [conversation(image, int(turns)) for image in images[1:]]
used = settings(llm)
llm.close()
print(json.dumps({"runs": runs, "turn_seconds": runs[0], "settings": used}))
