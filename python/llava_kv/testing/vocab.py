"""The test tokenizer: a SentencePiece-style (``llama``) vocabulary of byte tokens and English word
prefixes, and each family's special tokens and chat template (``_CHATS``), so that llama.cpp tokenizes,
detects templates and renders chats on a test model as it does on the family's real one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

_WORDS = """the of and to in is it you that he was for on are with as I his they be at one have this
from or had by hot but some what there we can out other were all your when up use word how said an
each she which do their time if will way about many then them would write like so these her long make
thing see him two has look more day could go come did my sound no most number who over know water
than call first people may down side been now find any new work part take get place made live where
after back little only round man year came show every good me give our under name very through just
form much great think say help low line before turn cause same mean differ move right boy old too
does tell sentence set three want air well also play small end put home read hand port large spell
add even land here must big high such follow act why ask men change went light kind off need house
picture try us again animal point mother world near build self earth father image cat dog red blue
green photo describe what color left right top bottom person car tree sky white black picture shows
USER ASSISTANT user assistant system question answer""".split()

# SentencePiece token types (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class _Chat:
    """A family's special tokens and chat template (written here after the family's own, so that
    llama.cpp's template detection picks the family's built-in renderer)."""
    specials: tuple[str, ...]
    template: str
    eos: str = "</s>"
    bos: str = "<s>"
    add_bos: bool = True


_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CHATML_SPECIALS = ("<|im_start|>", "<|im_end|>")

_CHATS: dict[str, _Chat] = {
    "chatml": _Chat(_CHATML_SPECIALS, _CHATML),
    "gemma": _Chat(
        ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"),
        "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
        "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
        "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}",
        eos="<end_of_turn>"),
    # Qwen2-VL / Qwen2.5-VL: ChatML without BOS; images between <|vision_start|> and <|vision_end|>.
    "qwen2vl": _Chat(_CHATML_SPECIALS + ("<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"),
                     _CHATML, eos="<|im_end|>", add_bos=False),
    # SmolVLM: <|im_start|> opens the prompt, turns are "User:" / "Assistant:" closed by <end_of_utterance>.
    "smolvlm": _Chat(
        ("<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<global-img>", "<image>", "\n\n")
        + tuple(f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)),
        "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}"
        "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}",
        eos="<end_of_utterance>", bos="<|im_start|>", add_bos=False),
    # Pixtral / Mistral Small 3.x: the v7 instruct format.
    "mistral": _Chat(
        ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"),
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ '[SYSTEM_PROMPT] ' + message['content'] + '[/SYSTEM_PROMPT]' }}{% elif message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + '[/INST]' }}{% else %}{{ ' ' + message['content'] + eos_token }}"
        "{% endif %}{% endfor %}"),
    # MiniCPM-V 2.6 (qwen2 text): ChatML; an image is <image>overview</image> then <slice>...</slice> rows.
    "minicpmv": _Chat(_CHATML_SPECIALS + ("<|endoftext|>", "<image>", "</image>", "<slice>", "</slice>"),
                      _CHATML, eos="<|im_end|>", add_bos=False),
    # InternVL 2.5 / 3 (qwen2 text): ChatML; tiles and thumbnail between <img> and </img>.
    "internvl": _Chat(_CHATML_SPECIALS + ("<|endoftext|>", "<img>", "</img>", "<IMG_CONTEXT>"),
                      _CHATML, eos="<|im_end|>", add_bos=False),
    # Qwen2-Audio (qwen2 text): ChatML; mtmd puts <|audio_bos|> / <|audio_eos|> around a clip's embeddings.
    "qwen2a": _Chat(_CHATML_SPECIALS + ("<|endoftext|>", "<|audio_bos|>", "<|audio_eos|>", "<|AUDIO|>"),
                    _CHATML, eos="<|im_end|>", add_bos=False),
    # LLaVA-1.6 (vicuna): "USER: ... ASSISTANT:".
    "vicuna": _Chat(
        (),
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ message['content'] + '\\n' }}{% elif message['role'] == 'user' %}{{ 'USER: ' + message['content'] + "
        "'\\n' }}{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}"),
}


def _vocab(n_vocab: int, specials: Sequence[str]) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + list(specials)
    types = [_UNKNOWN, _CONTROL, _CONTROL] + [_CONTROL] * len(specials)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [_BYTE] * 256
    pieces: list[str] = ["\u2581"] + [chr(c) for c in range(33, 127)]
    seen = set(pieces)
    for word in _WORDS:
        for k in range(1, len(word) + 1):
            piece = "\u2581" + word[:k]
            if piece not in seen:
                seen.add(piece)
                pieces.append(piece)
    for piece in pieces:
        tokens.append(piece)
        types.append(_NORMAL)
    if len(tokens) > n_vocab:
        raise ValueError(f"n_vocab={n_vocab} is below the {len(tokens)} tokens the test vocabulary needs")
    # Pad with ordinary pieces, so that what a random model writes is visible (gibberish) text.
    while len(tokens) < n_vocab:
        tokens.append(f"\u2581w{len(tokens):x}")
        types.append(_NORMAL)
    # SentencePiece merges the highest-scoring pair first: prefer longer pieces.
    scores = [0.0 if t != _NORMAL else -1000.0 + len(tok) for tok, t in zip(tokens, types)]
    return tokens, scores, types
