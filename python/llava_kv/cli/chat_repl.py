"""The ``llava-kv chat`` conversation loop: messages, image commands and what each edit cost."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Iterator, TextIO

from .options import UsageError, describe, err, reply_pieces, sampling, user_message

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


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class ChatRepl:
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
                self.say(f"  {component:<18} {device:<8} {fmt_bytes(n)}")
        for sid, parts in sorted(mem["sessions"].items()):
            for part, per_device in parts.items():
                for device, n in sorted(per_device.items()):
                    self.say(f"  {f'session {sid} {part}':<18} {device:<8} {fmt_bytes(n)}")
        for device, n in sorted(mem["total"].items()):
            self.say(f"  {'total':<18} {device:<8} {fmt_bytes(n)}")
        for device, d in sorted(mem["devices"].items()):
            self.say(f"  device {device} ({d.type}): {fmt_bytes(d.free)} free of {fmt_bytes(d.total)}, "
                     f"{fmt_bytes(d.allocated)} held by this process")

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
        self.messages.append(user_message(self.pending, text))
        before = self.s.stats
        try:
            chunks = self.s.chat(self.messages, chat_template=self.args.chat_template, stream=True,
                                 **sampling(self.args))
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
            for piece in reply_pieces(chunks):
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
            err(f"error: {e}")
        except (LlavaKVError, OSError, ValueError, TypeError, KeyError, IndexError) as e:
            err(f"error: {describe(e)}")
        except KeyboardInterrupt:
            err("(interrupted)")
        return True


def input_lines(interactive: bool) -> Iterator[str]:
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


