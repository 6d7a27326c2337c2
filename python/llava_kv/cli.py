"""The ``llava-kv`` command line: run, chat, batch, info, demo, make-test-model.

Replies go to stdout; notes, progress, summaries and errors go to stderr, so the output of ``run``
and ``batch --out -`` can be piped. Exit codes: 0 done, 1 a model or image error, 2 a usage
error (bad option, missing file, no image matched), 130 interrupted.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TextIO

import numpy as np

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


class UsageError(Exception):
    """A mistake in the command line itself: reported in one line, exit code 2."""


class _Formatter(argparse.HelpFormatter):
    """Wraps prose paragraphs to the terminal; keeps paragraphs with indented lines (example
    commands, command tables) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for para in text.split("\n\n"):
            lines = para.splitlines()
            if any(line.startswith(" ") for line in lines[1:]):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(textwrap.fill(" ".join(lines), width, initial_indent=indent,
                                                subsequent_indent=indent))
        return "\n\n".join(paragraphs)


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


# -- shared options -----------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser, *, test_pair: bool, required: bool = False) -> None:
    g = p.add_argument_group("model")
    if test_pair:
        g.add_argument("--model", metavar="GGUF",
                       help="text model GGUF (default: a generated random-weight test pair, see --preset)")
        g.add_argument("--mmproj", metavar="GGUF", help="projector (mmproj) GGUF that goes with --model; "
                       "without it the model reads text only")
        from llava_kv.testing import PRESETS

        g.add_argument("--preset", default="tiny-llava", choices=list(PRESETS),
                       help="test pair to generate when neither --model nor --mmproj is given; its weights "
                       "are random, so its text is gibberish (default: %(default)s)")
    else:
        g.add_argument("--model", metavar="GGUF", required=required, help="text model GGUF")
        g.add_argument("--mmproj", metavar="GGUF", required=required, help="projector (mmproj) GGUF for --model")
    g.add_argument("--n-gpu-layers", type=int, default=0, metavar="N",
                   help="layers to offload to the GPU; -1 offloads all (GPU builds; default: %(default)s)")
    g.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads (default: one per core)")
    g.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto",
                   help="flash attention: llama.cpp's choice, or forced on/off (default: %(default)s)")
    g.add_argument("--verbose", action="store_true", help="show llama.cpp's log on stderr")


def _add_template_args(g: Any) -> None:
    g.add_argument("--system", metavar="TEXT", help="system message")
    g.add_argument("--chat-template", metavar="NAME",
                   help="chat template to use instead of the model's own (e.g. chatml, llama3, gemma)")


def _add_sampling_args(p: argparse.ArgumentParser, *, max_tokens: int) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-tokens", type=_non_negative_int, default=max_tokens, metavar="N",
                   help="most tokens to generate per reply (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 is greedy, deterministic (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=40, metavar="K", help="top-k sampling (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=0.95, metavar="P", help="nucleus sampling (default: %(default)s)")
    g.add_argument("--min-p", type=float, default=0.05, metavar="P", help="min-p sampling (default: %(default)s)")
    g.add_argument("--repeat-penalty", type=float, default=1.0, metavar="X",
                   help="penalty for repeated tokens; 1 is none (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the reply contains TEXT, which is not printed (repeatable)")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "min_p": args.min_p, "repeat_penalty": args.repeat_penalty,
            "seed": args.seed, "stop": list(args.stop) or None}


def _model_paths(args: argparse.Namespace) -> tuple[str, str | None]:
    """The model pair to load; without --model and --mmproj, a generated test pair (said plainly)."""
    if args.model is None and args.mmproj is None and getattr(args, "preset", None):
        from llava_kv.testing import make_test_model

        pair = make_test_model(preset=args.preset)
        _err(f"No --model given: using the generated test pair '{pair.preset.name}' ({pair.model_path}). "
             "Its weights are RANDOM: any text it writes is gibberish.")
        return str(pair.model_path), str(pair.mmproj_path)
    if args.model is None:
        raise UsageError("--mmproj needs --model")
    for path, what in ((args.model, "model"), (args.mmproj, "mmproj")):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{what} file not found: {path}")
    return args.model, args.mmproj


def _load_model(args: argparse.Namespace, paths: tuple[str, str | None] | None = None) -> Any:
    import llava_kv as lk

    model_path, mmproj_path = paths or _model_paths(args)
    return lk.Model.load(model_path, mmproj_path, n_gpu_layers=args.n_gpu_layers, n_threads=args.threads,
                         flash_attn=args.flash_attn, verbose=args.verbose)


# -- demo ----------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    import llava_kv as lk
    from llava_kv.testing import make_test_model, random_image

    if args.model:
        model_path, mmproj_path = args.model, args.mmproj
        images: list = list(args.image) or [random_image(1), random_image(2)]
    else:
        pair = make_test_model(preset=args.preset)
        model_path, mmproj_path = str(pair.model_path), str(pair.mmproj_path)
        images = [random_image(1), random_image(2), random_image(3)]
        print(f"No --model given: using the generated test pair '{pair.preset.name}' ({model_path}).")
        print("Its weights are RANDOM: the numbers below are real, any text it would write is gibberish.\n")
    if len(images) < 2:
        images.append(images[0])

    with lk.Model.load(model_path, mmproj_path, verbose=args.verbose) as model:
        print(repr(model))
        with model.session(n_ctx=args.n_ctx) as s:
            t0 = time.perf_counter()
            s.append_text("USER: ")
            ref = s.append_image(images[0])
            s.append_text(" What is in this picture?\nASSISTANT:")
            t1 = time.perf_counter()
            top = np.argsort(s.logits())[::-1][:5]
            print(f"prompt: {len(s.timeline)} chunks, n_past={s.n_past}, {1000 * (t1 - t0):.1f} ms; "
                  f"top next tokens: {top.tolist()}")
            print(f"  image: {ref.path} -> {ref.n_tokens} tokens at positions [{ref.pos0}, {ref.pos1})")
            before = s.stats
            t0 = time.perf_counter()
            s.replace_image(ref, images[1])
            t1 = time.perf_counter()
            after = s.stats
            print(f"replace_image: {1000 * (t1 - t0):.1f} ms, re-decoded "
                  f"{after['tokens_decoded'] - before['tokens_decoded']} of {s.n_past} tokens, "
                  f"encoded {after['images_encoded'] - before['images_encoded']} image(s)")
            s.replace_image(s.images[0], images[0])
            print(f"replace back: embed cache hits {s.stats['embed_cache_hits']} "
                  f"(the first image's embedding was reused, not re-encoded)")
            s.images.clear()
            print(f"images.clear(): {len(s.images)} images, n_past={s.n_past}")
            mem = model.memory()
            print("memory (bytes): " + json.dumps({k: mem[k] for k in ("weights", "projector", "total")}))
    print(f"closed: model.closed={model.closed}")
    return 0


# -- info ----------------------------------------------------------------------------------------


def _template_used(model: Any) -> dict[str, str] | None:
    """The template ``chat`` renders with when not given one: the model's own or its architecture's."""
    from llava_kv.chat import choose_chat_template
    from llava_kv.errors import LlavaKVError

    try:
        chosen = choose_chat_template(model)
    except LlavaKVError:
        return None
    return {"name": chosen.name, "source": chosen.source}


def _info(args: argparse.Namespace) -> int:
    import llava_kv as lk

    from llava_kv.gguf_metadata import architecture, projector_type

    out: dict = {"version": lk.__version__, "build": lk.build_info()}
    if args.model or args.mmproj:
        with _load_model(args) as model:
            out["model"] = {"path": model.path, "mmproj": model.mmproj_path,
                            "family": architecture(model.path),
                            "projector_type": projector_type(model.mmproj_path) if model.mmproj_path else None,
                            "description": model._core.description, "n_embd": model.n_embd,
                            "n_vocab": model.n_vocab, "n_ctx_train": model.n_ctx_train,
                            "has_vision": model.has_vision, "uses_mrope": model._core.uses_mrope,
                            "chat_template": model.chat_template, "chat_template_used": _template_used(model),
                            "memory": model.memory()}
    print(json.dumps(out, indent=1, default=str))
    return 0


# -- run -----------------------------------------------------------------------------------------


def _check_images(paths: Sequence[str]) -> list[str]:
    out = []
    for p in paths:
        path = os.path.expanduser(p)
        if not os.path.isfile(path):
            raise UsageError(f"image file not found: {p}")
        out.append(path)
    return out


def _user_message(images: Sequence[str], text: str) -> dict[str, Any]:
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*({"type": "image", "image": p} for p in images),
                                        {"type": "text", "text": text}]}


def _run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    images = _check_images(args.image)
    messages: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    messages.append(_user_message(images, prompt))
    out = sys.stdout
    paths = _model_paths(args)
    if images and paths[1] is None:
        raise UsageError("--image needs a projector: pass --mmproj")
    with _load_model(args, paths) as model:
        with model.chat_session(n_ctx=args.n_ctx, seed=args.seed) as s:
            t0 = time.perf_counter()
            if args.json or args.no_stream:
                reply = s.chat(messages, chat_template=args.chat_template, **_sampling(args))
                if args.json:
                    out.write(json.dumps(reply, indent=1) + "\n")
                else:
                    out.write(reply["choices"][0]["message"]["content"] + "\n")
                prompt_tokens = reply["usage"]["prompt_tokens"]
            else:
                chunks = s.chat(messages, chat_template=args.chat_template, stream=True, **_sampling(args))
                prompt_tokens = s.n_past
                for chunk in chunks:
                    piece = chunk["choices"][0]["delta"].get("content")
                    if piece:
                        out.write(piece)
                        out.flush()
                out.write("\n")
            out.flush()
            if args.stats:
                seconds = time.perf_counter() - t0
                completion = s.n_past - prompt_tokens
                st = s.stats
                _err(f"prompt {prompt_tokens} tokens ({st['images_encoded']} image(s) encoded), "
                     f"reply {completion} tokens ({s.last_finish_reason}), {seconds:.2f} s total")
    return 0


# -- chat ----------------------------------------------------------------------------------------

CHAT_HELP = """\
Commands (any other line is a message; // sends a message that starts with /):
  /image PATH       attach an image to your next message (repeat to attach several)
  /replace I PATH   replace image I (0-based, as /images lists them) with PATH
  /remove I         remove image I (exact: what followed it is re-decoded)
  /clear            remove every image from the conversation
  /images           list the images, sent and attached
  /memory           bytes held per component and device
  /stats            the session's counters (tokens decoded, images encoded, cache hits...)
  /reset            start a new conversation (keeps --system)
  /help             this text
  /quit             leave (so does Ctrl-D)"""


class _ChatRepl:
    """The conversation is an OpenAI-style ``messages`` list that ``session.chat`` renders each turn;
    the session diffs it against its timeline, so a turn only decodes what is new. Image edits go
    through the registry at once (so their cost is known and reported) and are mirrored into
    ``messages``, so the next turn finds nothing else to recompute."""

    def __init__(self, model: Any, session: Any, args: argparse.Namespace, out: TextIO) -> None:
        self.model, self.s, self.args, self.out = model, session, args, out
        self.system = [{"role": "system", "content": args.system}] if args.system else []
        self.messages: list[dict[str, Any]] = list(self.system)
        self.pending: list[str] = []

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # -- images ---------------------------------------------------------------------------------

    def _slots(self) -> list[tuple[int, int]]:
        """(message index, part index) of every image in ``messages``, in conversation order."""
        return [(mi, pi) for mi, m in enumerate(self.messages) if isinstance(m["content"], list)
                for pi, part in enumerate(m["content"]) if part.get("type") == "image"]

    def _in_sync(self) -> bool:
        return len(self.s.images) == len(self._slots())

    def _check_image(self, text: str) -> str:
        from llava_kv.images import load_image

        path = text.strip()
        if len(path) >= 2 and path[0] == path[-1] and path[0] in "'\"":
            path = path[1:-1]
        if not path:
            raise UsageError("usage: /image PATH")
        if not self.model.has_vision:
            raise UsageError("this model has no projector: start the chat with --mmproj to use images")
        path = os.path.expanduser(path)
        load_image(path, self.model.projector_id)  # a bad file fails here, before anything changes
        return path

    def _index(self, text: str) -> int:
        n = len(self._slots()) + len(self.pending)
        try:
            i = int(text)
        except ValueError:
            raise UsageError(f"image index must be a number, got {text!r}") from None
        if not 0 <= i < n:
            raise UsageError(f"no image {i}: the conversation has {n} image(s)" + (" (see /images)" if n else ""))
        return i

    def _edit(self, label: str, apply: Callable[[], None]) -> None:
        before, t0 = self.s.stats, time.perf_counter()
        apply()
        ms, after = 1000 * (time.perf_counter() - t0), self.s.stats
        decoded = after["tokens_decoded"] - before["tokens_decoded"]
        encoded = after["images_encoded"] - before["images_encoded"]
        hits = after["embed_cache_hits"] - before["embed_cache_hits"]
        cached = f", {hits} from the embedding cache" if hits else ""
        self.say(f"[{label}: re-decoded {decoded} of {self.s.n_past} tokens, encoded {encoded} image(s){cached}, "
                 f"{ms:.1f} ms]")

    def cmd_image(self, rest: str) -> None:
        path = self._check_image(rest)
        self.pending.append(path)
        self.say(f"[image {len(self._slots()) + len(self.pending) - 1} attached: {path} "
                 "(sent with your next message)]")

    def cmd_replace(self, rest: str) -> None:
        index_text, _, path_text = rest.strip().partition(" ")
        if not index_text or not path_text.strip():
            raise UsageError("usage: /replace I PATH")
        i = self._index(index_text)
        path = self._check_image(path_text)
        slots = self._slots()
        if i >= len(slots):
            self.pending[i - len(slots)] = path
            self.say(f"[replaced attached image {i}: nothing to recompute until it is sent]")
            return
        mi, pi = slots[i]
        if self._in_sync():
            def apply() -> None:
                self.s.images[i] = path
            self._edit(f"replaced image {i}", apply)
        else:
            self.say(f"[image {i} will be replaced at your next message]")
        self.messages[mi]["content"][pi] = {"type": "image", "image": path}

    def cmd_remove(self, rest: str) -> None:
        if not rest.strip():
            raise UsageError("usage: /remove I")
        i = self._index(rest.strip())
        slots = self._slots()
        if i >= len(slots):
            del self.pending[i - len(slots)]
            self.say(f"[removed attached image {i}]")
            return
        mi, pi = slots[i]
        if self._in_sync():
            def apply() -> None:
                del self.s.images[i]
            self._edit(f"removed image {i}", apply)
        else:
            self.say(f"[image {i} will be removed at your next message]")
        del self.messages[mi]["content"][pi]

    def cmd_clear(self, rest: str) -> None:
        n = len(self._slots())
        if n and self._in_sync():
            self._edit(f"cleared {n} image(s)", self.s.images.clear)
        else:
            self.say(f"[cleared {n} image(s)]")
        for m in self.messages:
            if isinstance(m["content"], list):
                m["content"] = [part for part in m["content"] if part.get("type") != "image"]
        self.pending.clear()

    def cmd_images(self, rest: str) -> None:
        refs = list(self.s.images) if self._in_sync() else []
        slots = self._slots()
        if not slots and not self.pending:
            self.say("[no images]")
        for i, (mi, pi) in enumerate(slots):
            where = (f", {refs[i].n_tokens} tokens at positions [{refs[i].pos0}, {refs[i].pos1})" if refs else "")
            self.say(f"  {i}: {self.messages[mi]['content'][pi]['image']}{where}")
        for k, path in enumerate(self.pending):
            self.say(f"  {len(slots) + k}: {path} (attached, not sent yet)")

    def cmd_memory(self, rest: str) -> None:
        mem = self.model.memory()
        for component in ("weights", "projector", "embedding_cache"):
            for device, n in sorted(mem[component].items()):
                self.say(f"  {component:<18} {device:<8} {_fmt_bytes(n)}")
        for sid, parts in sorted(mem["sessions"].items()):
            for part, per_device in parts.items():
                for device, n in sorted(per_device.items()):
                    self.say(f"  {f'session {sid} {part}':<18} {device:<8} {_fmt_bytes(n)}")
        for device, n in sorted(mem["total"].items()):
            self.say(f"  {'total':<18} {device:<8} {_fmt_bytes(n)}")
        for device, d in sorted(mem["devices"].items()):
            self.say(f"  device {device} ({d['type']}): {_fmt_bytes(d['free'])} free of {_fmt_bytes(d['total'])}")

    def cmd_stats(self, rest: str) -> None:
        self.say(f"  n_past {self.s.n_past} of n_ctx {self.s.n_ctx}, {len(self.s.images)} image(s), "
                 f"{len(self.s.timeline)} chunks")
        for key, value in sorted(self.s.stats.items()):
            self.say(f"  {key} {value}")

    def cmd_reset(self, rest: str) -> None:
        self.s.clear()
        self.messages = list(self.system)
        self.pending.clear()
        self.say("[new conversation]")

    def cmd_help(self, rest: str) -> None:
        self.say(CHAT_HELP)

    # -- turns ----------------------------------------------------------------------------------

    def send(self, text: str) -> None:
        self.messages.append(_user_message(self.pending, text))
        before = self.s.stats
        try:
            chunks = self.s.chat(self.messages, chat_template=self.args.chat_template, stream=True,
                                 **_sampling(self.args))
        except BaseException:
            self.messages.pop()  # the session is unchanged after a failed call: so are the messages
            raise
        # chat() has brought the timeline up to the new prompt: from here the turn is part of it
        self.pending.clear()
        mid, prompt_tokens = self.s.stats, self.s.n_past
        decoded = mid["tokens_decoded"] - before["tokens_decoded"]
        encoded = mid["images_encoded"] - before["images_encoded"]
        pieces: list[str] = []
        note = ""
        try:
            for chunk in chunks:
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    pieces.append(piece)
                    self.out.write(piece)
                    self.out.flush()
        except KeyboardInterrupt:
            chunks.close()
            note = ", interrupted"
        finally:
            self.messages.append({"role": "assistant", "content": "".join(pieces)})
            self.out.write("\n")
        finish = self.s.last_finish_reason if not note else "interrupted"
        self.say(f"[reply {self.s.n_past - prompt_tokens} tokens ({finish}); prompt: {decoded} tokens decoded, "
                 f"{prompt_tokens - decoded} reused, {encoded} image(s) encoded]")

    def handle(self, line: str) -> bool:
        """One input line; False when the user asked to leave."""
        from llava_kv.errors import LlavaKVError

        text = line.strip()
        if not text:
            return True
        try:
            if text.startswith("/") and not text.startswith("//"):
                name, _, rest = text[1:].partition(" ")
                if name in ("quit", "exit", "q"):
                    return False
                command = getattr(self, f"cmd_{name}", None)
                if command is None:
                    raise UsageError(f"unknown command /{name}; /help lists the commands")
                command(rest)
            else:
                self.send(text[1:] if text.startswith("//") else text)
        except UsageError as e:
            _err(f"error: {e}")
        except (LlavaKVError, OSError, ValueError, TypeError, KeyError, IndexError) as e:
            _err(f"error: {_describe(e)}")
        except KeyboardInterrupt:
            _err("(interrupted)")
        return True


def _input_lines(interactive: bool) -> Iterator[str]:
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D leaves)")
            continue
        if not interactive and not line:
            return
        yield line.rstrip("\r\n")


def _chat(args: argparse.Namespace) -> int:
    images = _check_images(args.image)
    interactive = sys.stdin.isatty()
    paths = _model_paths(args)
    if images and paths[1] is None:
        raise UsageError("--image needs a projector: pass --mmproj")
    with _load_model(args, paths) as model, model.chat_session(n_ctx=args.n_ctx, seed=args.seed) as s:
        repl = _ChatRepl(model, s, args, sys.stdout)
        for path in images:
            repl.handle(f"/image {path}")
        _err(f"llava-kv chat with {model!r}. Type a message; /help lists the commands; /quit or Ctrl-D leaves.")
        for line in _input_lines(interactive):
            if not repl.handle(line):
                break
    return 0


# -- batch ---------------------------------------------------------------------------------------


def _path_key(path: str) -> str:
    return os.path.normcase(os.path.abspath(path))


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_images(folder: str) -> Iterator[str]:
    """Image files under ``folder``, recursively: a folder's own files (sorted) before its subfolders
    (sorted); hidden files and folders are left out."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and _is_image_name(name):
                yield os.path.join(root, name)


def expand_paths(patterns: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Expand batch PATHs into image files, in order and without duplicates.

    A file is taken as given (whatever its extension: it gets its own error record if it is not an
    image); a folder gives its image files, recursively; a glob (``*``, ``?``, ``[``; ``**`` matches
    folders recursively) gives the image files and folders it matches. Returns ``(paths,
    unmatched, missing)``: globs and folders that gave no image, and named files that do not exist
    (kept in ``paths`` so that they get an error record).
    """
    paths: list[str] = []
    seen: set[str] = set()
    unmatched: list[str] = []
    missing: list[str] = []

    def add(path: str) -> bool:
        key = _path_key(path)
        if key not in seen:
            seen.add(key)
            paths.append(path)
        return True

    for pattern in patterns:
        path = os.path.expanduser(pattern)
        found = False
        if os.path.isdir(path):
            for f in _walk_images(path):
                found = add(f)
        elif os.path.isfile(path):
            found = add(path)
        elif any(c in path for c in "*?["):
            for match in sorted(glob.glob(path, recursive=True)):
                if os.path.isdir(match):
                    for f in _walk_images(match):
                        found = add(f)
                elif os.path.isfile(match) and _is_image_name(match):
                    found = add(match)
        else:
            missing.append(pattern)
            add(path)
            continue
        if not found:
            unmatched.append(pattern)
    return paths, unmatched, missing


def _read_results(path: Path) -> tuple[list[tuple[bytes, dict[str, Any] | None]], bool]:
    """The lines of an existing results file, parsed where they are records, and whether the file
    needs rewriting before anything is appended (a last line cut off by an interrupted run, or
    missing its newline)."""
    if not path.exists():
        return [], False
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()
    entries: list[tuple[bytes, dict[str, Any] | None]] = []
    for raw in lines:
        entries.append((raw, _parse_record(raw)))
    needs_rewrite = False
    if tail.strip():
        record = _parse_record(tail)
        needs_rewrite = True
        if record is not None:
            entries.append((tail, record))
        else:
            _err(f"note: ignoring the cut-off last line of {path} (its image is run again)")
    return entries, needs_rewrite


def _parse_record(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("image"), str) else None


def _batch(args: argparse.Namespace) -> int:
    paths, unmatched, missing = expand_paths(args.paths)
    for pattern in unmatched:
        _err(f"warning: no image matches {pattern!r}")
    if len(missing) == len(paths):
        raise UsageError("no PATH matched an image file: " + " ".join(map(repr, args.paths)))
    for pattern in missing:
        _err(f"warning: {pattern}: no such file (it gets an error record)")
    model_paths = _model_paths(args)

    to_stdout = args.out in (None, "-")
    out_path = None if to_stdout else Path(args.out)
    entries: list[tuple[bytes, dict[str, Any] | None]] = []
    needs_rewrite = False
    if out_path is not None:
        if out_path.is_dir():
            raise UsageError(f"--out {args.out} is a folder; give a .jsonl file")
        entries, needs_rewrite = _read_results(out_path)
    done: dict[str, dict[str, Any]] = {}
    for _, record in entries:
        if record is not None:
            done[_path_key(record["image"])] = record
    todo: list[str] = []
    retry: set[str] = set()
    skipped = 0
    for path in paths:
        record = done.get(_path_key(path))
        if record is None:
            todo.append(path)
        elif record.get("error") and args.retry_errors:
            todo.append(path)
            retry.add(_path_key(path))
        else:
            skipped += 1

    ok = failed = 0
    failures: list[tuple[str, str]] = []
    interrupted = False
    if todo:
        from llava_kv import batch as lk_batch

        if out_path is not None and (needs_rewrite or retry):
            # drop the error records about to be retried (so each image keeps one line) and a cut-off
            # last line; written aside and renamed, so an interruption loses nothing
            keep = [raw for raw, record in entries
                    if not (record is not None and record.get("error") and _path_key(record["image"]) in retry)]
            tmp = out_path.with_name(out_path.name + ".tmp")
            tmp.write_bytes(b"".join(raw + b"\n" for raw in keep))
            os.replace(tmp, out_path)
        if out_path is not None and out_path.parent != Path(""):
            out_path.parent.mkdir(parents=True, exist_ok=True)
        sink = sys.stdout if out_path is None else open(out_path, "a", encoding="utf-8")
        try:
            with _load_model(args, model_paths) as model:
                records = lk_batch.iter_run(
                    model, todo, args.prompt, ordered=True, parallel=args.parallel, progress=not args.no_progress,
                    system=args.system, chat_template=args.chat_template, n_ctx=args.n_ctx, n_threads=args.threads,
                    **_sampling(args))
                try:
                    for result in records:
                        sink.write(json.dumps(result.to_dict()) + "\n")
                        sink.flush()
                        if result.error:
                            failed += 1
                            failures.append((result.image, result.error))
                        else:
                            ok += 1
                except KeyboardInterrupt:
                    interrupted = True
                finally:
                    close = getattr(records, "close", None)
                    if close is not None:
                        close()
        finally:
            if sink is not sys.stdout:
                sink.close()
    for image, error in failures[:10]:
        _err(f"failed: {image}: {error}")
    if len(failures) > 10:
        _err(f"... and {len(failures) - 10} more failures (see the error fields)")
    where = "" if out_path is None else f" -> {out_path}"
    left = f", {len(todo) - ok - failed} not run (interrupted; run again to resume)" if interrupted else ""
    _err(f"{ok} ok, {failed} failed, {skipped} skipped{left}{where}")
    return 130 if interrupted else 0


# -- make-test-model -----------------------------------------------------------------------------


def _make_test_model(args: argparse.Namespace) -> int:
    from llava_kv.testing import main as make_main

    argv = ["--preset", args.preset, "--seed", str(args.seed)]
    if args.out is not None:
        argv += ["--out", args.out]
    if args.overwrite:
        argv.append("--overwrite")
    return make_main(argv)


# -- the parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from llava_kv.testing import PRESETS, default_cache_dir

    parser = argparse.ArgumentParser(
        prog="llava-kv", formatter_class=_Formatter,
        description="Vision-language models (GGUF text model + mmproj projector) on llama.cpp, with one state "
        "for images, embeddings and KV cache: images can be added, replaced or removed anywhere in a "
        "conversation and only what the edit invalidated is recomputed.",
        epilog="examples:\n"
        "  llava-kv run --model m.gguf --mmproj p.gguf --image cat.jpg --prompt 'What is this?'\n"
        "  llava-kv chat --model m.gguf --mmproj p.gguf\n"
        "  llava-kv batch --model m.gguf --mmproj p.gguf --prompt 'Caption:' --out out.jsonl photos/\n"
        "  llava-kv demo            # no model needed: uses a generated random-weight pair\n\n"
        "'llava-kv COMMAND --help' describes each command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # run
    run = sub.add_parser(
        "run", formatter_class=_Formatter, help="answer one prompt about zero or more images",
        description="Answer one prompt (with the model's chat template) about zero or more images, streaming "
        "the reply to stdout as it is generated.",
        epilog="examples:\n"
        "  llava-kv run --model m.gguf --mmproj p.gguf --image cat.jpg --prompt 'What is this?'\n"
        "  llava-kv run --model m.gguf --mmproj p.gguf --image a.png --image b.png \\\n"
        "      --prompt 'What changed?' --max-tokens 200 --json\n"
        "  echo 'Describe it.' | llava-kv run --model m.gguf --mmproj p.gguf --image x.jpg --prompt -")
    _add_model_args(run, test_pair=True)
    g = run.add_argument_group("prompt")
    g.add_argument("--prompt", required=True, help="the question or instruction; '-' reads it from stdin")
    g.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="image shown before the prompt (repeatable; in order)")
    _add_template_args(g)
    g.add_argument("--n-ctx", type=_positive_int, default=4096, metavar="N",
                   help="context size in tokens (default: %(default)s)")
    _add_sampling_args(run, max_tokens=256)
    g = run.add_argument_group("output")
    g.add_argument("--no-stream", action="store_true", help="print the reply once it is complete")
    g.add_argument("--json", action="store_true",
                   help="print the whole OpenAI-style chat.completion object (usage, finish_reason, llava_kv "
                   "counters) as JSON instead of the text")
    g.add_argument("--stats", action="store_true", help="print token counts and time to stderr")
    run.set_defaults(func=_run)

    # chat
    chat = sub.add_parser(
        "chat", formatter_class=_Formatter, help="interactive conversation with image commands",
        description="Interactive conversation on stdin (a terminal or a pipe). Each line is a message; the "
        "reply streams back. Image commands edit the conversation in place: only what an edit "
        "invalidated is recomputed, and each edit prints what it cost.\n\n" + CHAT_HELP,
        epilog="examples:\n"
        "  llava-kv chat --model m.gguf --mmproj p.gguf --image cat.jpg\n"
        "  printf '/image a.png\\nWhat is this?\\n/replace 0 b.png\\nAnd now?\\n' | \\\n"
        "      llava-kv chat --model m.gguf --mmproj p.gguf")
    _add_model_args(chat, test_pair=True)
    g = chat.add_argument_group("conversation")
    g.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="image attached to the first message (repeatable)")
    _add_template_args(g)
    g.add_argument("--n-ctx", type=_positive_int, default=4096, metavar="N",
                   help="context size in tokens for the whole conversation (default: %(default)s)")
    _add_sampling_args(chat, max_tokens=256)
    chat.set_defaults(func=_chat)

    # batch
    batch = sub.add_parser(
        "batch", formatter_class=_Formatter, help="one prompt over many images -> JSON lines, resumable",
        description="Run one prompt over many images, several in parallel (the prompt prefix is decoded "
        "once and shared), and write one JSON line per image: image, text, tokens, finish_reason, "
        "cached, timings, error. A failed image (unreadable, missing) gets a line with its error and the "
        "others go on. Lines are appended as results arrive, so rerunning the same command skips the "
        "images already in the output file and resumes an interrupted run.\n\n"
        "PATHs: a file is taken as given; a folder gives its image files recursively (jpg jpeg png "
        "bmp gif webp tif tiff, any case; hidden files skipped; sorted); a glob gives the image "
        "files and folders it matches ('**' matches folders recursively; quote it). Duplicates are "
        "dropped. A summary 'N ok, M failed, K skipped' goes to stderr; the exit code is 0 when every "
        "image was processed, even if some failed, and 2 for usage errors (no PATH matched, missing "
        "model).",
        epilog="examples:\n"
        "  llava-kv batch --model m.gguf --mmproj p.gguf --prompt 'Caption this image.' \\\n"
        "      --max-tokens 64 --out captions.jsonl photos/ 'scans/**/*.png' extra.jpg\n"
        "  # rerun after an interruption: done images are skipped; retry the failed ones:\n"
        "  llava-kv batch ... --out captions.jsonl --retry-errors photos/")
    _add_model_args(batch, test_pair=False, required=True)
    g = batch.add_argument_group("input and output")
    g.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or globs")
    g.add_argument("--prompt", required=True, help="the prompt asked about every image")
    g.add_argument("--out", metavar="FILE",
                   help="JSON-lines file to append results to (created if missing; its images are skipped); "
                   "'-' or no --out writes to stdout")
    g.add_argument("--retry-errors", action="store_true",
                   help="run again the images whose line in --out has an error (their old lines are replaced)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    g = batch.add_argument_group("run")
    g.add_argument("--parallel", type=_positive_int, default=4, metavar="N",
                   help="images generated at the same time (default: %(default)s)")
    _add_template_args(g)
    g.add_argument("--n-ctx", type=_positive_int, default=None, metavar="N",
                   help="context size per image (default: what the prompt, image and --max-tokens need)")
    _add_sampling_args(batch, max_tokens=64)
    batch.set_defaults(func=_batch)

    # info
    info = sub.add_parser(
        "info", formatter_class=_Formatter, help="build information, model metadata and memory, as JSON",
        description="Print JSON: the llava-kv version and build (llama.cpp commit, compiled backends, devices "
        "seen now); with --model also the model's family (its GGUF architecture, e.g. gemma3, qwen2vl), the "
        "projector type of --mmproj (e.g. mlp, gemma3, idefics3), the model's metadata (embedding width, "
        "vocabulary, trained context, vision, chat template) and the memory it holds per component and device "
        "once loaded.",
        epilog="examples:\n"
        "  llava-kv info\n"
        "  llava-kv info --model m.gguf --mmproj p.gguf --n-gpu-layers -1")
    _add_model_args(info, test_pair=False)
    info.set_defaults(func=_info)

    # demo
    demo = sub.add_parser(
        "demo", formatter_class=_Formatter, help="evaluate a prompt with an image, edit the image, report memory",
        description="Evaluate a prompt with an image, replace the image (showing how few tokens are "
        "re-decoded and that the embedding cache is used), clear the images and report memory. Runs end "
        "to end on a generated random-weight pair when no --model is given.",
        epilog="examples:\n  llava-kv demo\n  llava-kv demo --model m.gguf --mmproj p.gguf --image a.jpg --image b.jpg")
    demo.add_argument("--model", metavar="GGUF", help="text model GGUF (default: a generated test pair)")
    demo.add_argument("--mmproj", metavar="GGUF", help="projector GGUF for --model")
    demo.add_argument("--image", action="append", default=[], metavar="PATH",
                      help="image file (repeatable; the first two are used; default: generated images)")
    demo.add_argument("--preset", default="tiny-llava", choices=list(PRESETS),
                      help="test pair to generate without --model (default: %(default)s)")
    demo.add_argument("--n-ctx", type=_positive_int, default=2048, metavar="N",
                      help="context size in tokens (default: %(default)s)")
    demo.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    demo.set_defaults(func=_demo)

    # make-test-model
    make = sub.add_parser(
        "make-test-model", formatter_class=_Formatter, help="write a small random-weight GGUF pair",
        description="Write a random-weight GGUF pair (text model + mmproj) for tests, demos and benchmarks, "
        "and print its paths as JSON. Random weights give gibberish text but real shapes, real code paths "
        "and deterministic logits. Files are reused when they already exist.\n\npresets:\n"
        + "\n".join(f"  {p.name:<12} {p.description}" for p in PRESETS.values()),
        epilog="examples:\n  llava-kv make-test-model\n  llava-kv make-test-model --preset tiny-gemma3 --out models/")
    make.add_argument("--preset", default="tiny-llava", choices=list(PRESETS),
                      help="shape of the pair (default: %(default)s)")
    make.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    make.add_argument("--out", metavar="DIR", default=None, help=f"output folder (default: {default_cache_dir()})")
    make.add_argument("--overwrite", action="store_true", help="write the files again even if they exist")
    make.set_defaults(func=_make_test_model)
    return parser


def _describe(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"{e.strerror or 'not found'}: {e.filename}"
    if isinstance(e, KeyError):
        return f"not found: {e.args[0] if e.args else e}"
    return str(e) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    from llava_kv.errors import LlavaKVError

    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    prefix = f"llava-kv {args.command}: error:"
    try:
        return int(args.func(args))
    except UsageError as e:
        _err(f"{prefix} {e}")
        return 2
    except FileNotFoundError as e:
        _err(f"{prefix} {_describe(e)}")
        return 2
    except (LlavaKVError, OSError, ValueError, ImportError) as e:
        _err(f"{prefix} {_describe(e)}")
        return 1
    except KeyboardInterrupt:
        sys.stdout.flush()
        _err("\ninterrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
