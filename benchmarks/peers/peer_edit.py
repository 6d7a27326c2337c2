"""Runs inside the llama-cpp-python venv: the edit scenarios of scenarios/edits.py as a user of
llama-cpp-python has to do them. Its chat handler has no way to change one image of a conversation:
every call resets the context, encodes every image again and prefills the whole prompt, so an edit
is a new call with the edited messages. Prints JSON: seconds per call (each repetition), image
encodes per call (counted by wrapping the handler's image-chunk evaluation) and prompt tokens.

Usage: peer_edit.py SPEC.json
SPEC: {"model", "mmproj", "n_ctx", "n_gpu_layers", "repeats", "system": text,
       "blocks": [[image.png, text], ...] (3 blocks: A, B, C), "replacement": image.png (D)}"""
import base64
import json
import sys
import time

from llama_cpp import Llama
from llama_cpp.llama_chat_format import Llava15ChatHandler

from peer_settings import llama_kwargs, settings  # benchmarks/peers/, this script's folder: same settings as ours

spec = json.load(open(sys.argv[1]))


def uri(path):
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


class CountingMtmd:
    """The handler's mtmd module, counting image chunks evaluated (each is one encode)."""

    def __init__(self, module):
        self._module = module
        self.image_evals = 0

    def __getattr__(self, name):
        value = getattr(self._module, name)
        if name == "mtmd_helper_eval_chunk_single":
            def counted(*args, **kwargs):
                self.image_evals += 1
                return value(*args, **kwargs)
            return counted
        return value


handler = Llava15ChatHandler(clip_model_path=spec["mmproj"], verbose=False)
counter = CountingMtmd(handler._mtmd_cpp)
handler._mtmd_cpp = counter
llm = Llama(model_path=spec["model"], chat_handler=handler, **llama_kwargs(spec["n_ctx"], spec["n_gpu_layers"]))
uris = {p: uri(p) for p in [b[0] for b in spec["blocks"]] + [spec["replacement"]]}


def messages(blocks, system=None):
    out = [{"role": "system", "content": system or spec["system"]}]
    for image, text in blocks:
        out.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": uris[image]}},
                                                {"type": "text", "text": text}]})
    return out


def call(blocks, system=None):
    """One call showing the conversation ``blocks``: seconds, image encodes, prompt tokens."""
    before = counter.image_evals
    t0 = time.perf_counter()
    r = llm.create_chat_completion(messages=messages(blocks, system), max_tokens=1, temperature=0.0, repeat_penalty=1.0)
    seconds = time.perf_counter() - t0
    return seconds, counter.image_evals - before, r["usage"]["prompt_tokens"]


blocks = [tuple(b) for b in spec["blocks"]]
d = (spec["replacement"], None)
last = blocks[:2] + [(d[0], blocks[2][1])]
middle = [blocks[0], (d[0], blocks[1][1]), blocks[2]]
first = [(d[0], blocks[0][1])] + blocks[1:]
call(blocks)  # warm-up: the conversation before the edits
out: dict = {"replace_last_image": [], "replace_middle_image": [], "replace_first_image": [], "readd_image": [],
             "new_conversation": [],
             "encodes": {}, "prompt_tokens": {}}
out["encodes_per_repetition"] = {"new_conversation": []}
for repetition in range(spec["repeats"]):
    for key, target in (("replace_last_image", last), ("replace_middle_image", middle),
                        ("replace_first_image", first)):
        # no call restores the conversation before the edit: the handler resets the context on every call
        seconds, encodes, tokens = call(target)
        out[key].append(seconds)
        out["encodes"][key], out["prompt_tokens"][key] = encodes, tokens
    call(blocks[:2])  # remove the last image...
    seconds, encodes, tokens = call(blocks)  # ...and add it again
    out["readd_image"].append(seconds)
    out["encodes"]["readd_image"], out["prompt_tokens"]["readd_image"] = encodes, tokens
    # image A, seen above, in a brand-new conversation with other text before it
    # (scenarios/edits.py, critic_system: a different system message each repetition)
    system = f"{spec['critic_system']} Conversation {repetition + 1}."
    seconds, encodes, tokens = call([(blocks[0][0], spec["critic_text"])], system)
    out["new_conversation"].append(seconds)
    out["encodes_per_repetition"]["new_conversation"].append(encodes)
    out["encodes"]["new_conversation"], out["prompt_tokens"]["new_conversation"] = encodes, tokens
out["settings"] = settings(llm)
llm.close()
print(json.dumps(out))
