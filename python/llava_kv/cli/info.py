"""``llava-kv info``: the build, and with --model the model's metadata and memory, as JSON."""
from __future__ import annotations

import argparse
import json
from typing import Any

from .options import add_command, add_model_args, load_model


def add_parser(sub: Any) -> None:
    p = add_command(
        sub, "info", help="build information, model metadata and memory, as JSON",
        description="Print JSON: the llava-kv version and build (llama.cpp commit, compiled backends, devices "
        "seen now); with --model also the model's family (its GGUF architecture, e.g. gemma3, qwen2vl), the "
        "projector type of --mmproj (e.g. mlp, gemma3, idefics3), the model's metadata (embedding width, "
        "vocabulary, trained context, vision, chat template) and the memory it holds per component and device "
        "once loaded.",
        examples=[
            "llava-kv info",
            "llava-kv info --model m.gguf --mmproj p.gguf --n-gpu-layers -1",
        ])
    add_model_args(p, test_pair=False)
    p.set_defaults(func=info)


def _template_used(model: Any) -> dict[str, str] | None:
    """The template ``chat`` renders with when not given one: the model's own or its architecture's."""
    from llava_kv.chat import choose_chat_template
    from llava_kv.errors import LlavaKVError

    try:
        chosen = choose_chat_template(model)
    except LlavaKVError:
        return None
    return {"name": chosen.name, "source": chosen.source}


def memory_json(report: Any) -> dict[str, Any]:
    """``Model.memory()`` with its device records as dicts."""
    return {**report, "devices": {name: d.as_dict() for name, d in report["devices"].items()}}


def info(args: argparse.Namespace) -> int:
    import llava_kv as lk

    from llava_kv.gguf import architecture, projector_type

    build = lk.build_info()
    out: dict[str, Any] = {"version": lk.__version__, "build": {**build, "devices": [d.as_dict() for d in build["devices"]]}}
    if args.model or args.mmproj:
        with load_model(args) as model:
            out["model"] = {"path": model.path, "mmproj": model.mmproj_path,
                            "family": architecture(model.path),
                            "projector_type": projector_type(model.mmproj_path) if model.mmproj_path else None,
                            "description": model.description, "n_embd": model.n_embd,
                            "n_vocab": model.n_vocab, "n_ctx_train": model.n_ctx_train,
                            "has_vision": model.has_vision, "uses_mrope": model.uses_mrope,
                            "kv_type": model.kv_type, "flash_attn": model.flash_attn,
                            "chat_template": model.chat_template, "chat_template_used": _template_used(model),
                            "memory": memory_json(model.memory())}
    print(json.dumps(out, indent=1, default=str))
    return 0
