"""Chat on a GGUF without ``tokenizer.chat_template``: the architecture's built-in template, said so.

The files without a template are the tiny presets with the key removed by gguf's own
``gguf_new_metadata`` script, so everything else about them (tokens, weights) is as generated.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import llava_kv as lk
from llava_kv import batch
from llava_kv.chat import ARCH_CHAT_TEMPLATES, choose_chat_template
from llava_kv.gguf import TEXT_ARCHITECTURES, architecture, projector_type


def _without_template(src: Path, dst: Path) -> Path:
    try:
        import gguf.scripts.gguf_new_metadata  # noqa: F401
    except ImportError:
        pytest.skip("this gguf package has no gguf.scripts.gguf_new_metadata to remove the template with")
    result = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--force",
                             "--remove-metadata", "tokenizer.chat_template", str(src), str(dst)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return dst


@pytest.fixture(scope="module")
def bare_gemma(gemma_pair, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _without_template(gemma_pair.model_path, tmp_path_factory.mktemp("bare") / "gemma3-bare.gguf")


@pytest.fixture(scope="module")
def bare_llama(llava_pair, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _without_template(llava_pair.model_path, tmp_path_factory.mktemp("bare") / "llama-bare.gguf")


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe the sky."}]


def _rendered(s: lk.Session) -> list[str]:
    return [c.text or "" for c in s.timeline if not c.generated]


def test_chat_without_template_uses_the_architectures_builtin(bare_gemma, gemma_pair, tmp_path, caplog):
    path = Path(shutil.copy(bare_gemma, tmp_path / "fresh-name.gguf"))  # its first chat logs the choice
    with lk.Model.load(path, gemma_pair.mmproj_path) as m:
        assert m.chat_template is None
        with m.session() as s, caplog.at_level(logging.INFO, logger="llava_kv"):
            reply = s.chat(MESSAGES, max_tokens=3)
            assert reply["llava_kv"]["chat_template"] == "gemma"
            assert reply["llava_kv"]["chat_template_source"] == "architecture"
            ours = _rendered(s)
            s.chat(MESSAGES, max_tokens=3)
    announced = [r.getMessage() for r in caplog.records if r.name == "llava_kv"]
    assert len(announced) == 1, announced  # once per model file, not once per turn
    assert "'gemma'" in announced[0] and "'gemma3'" in announced[0] and str(path) in announced[0]
    # The very prompt that naming the template gives, on the same file.
    with lk.Model.load(path, gemma_pair.mmproj_path) as m, m.session() as s:
        s.chat(MESSAGES, max_tokens=0, chat_template="gemma")
        assert _rendered(s) == ours
    assert ours[0].startswith("<start_of_turn>user\nBe brief.\n\nDescribe the sky.<end_of_turn>")


def test_chat_with_an_image_on_the_builtin_template(bare_gemma, gemma_pair, images):
    with lk.Model.load(bare_gemma, gemma_pair.mmproj_path) as m, m.session() as s:
        reply = s.chat([{"role": "user", "content": [{"type": "image", "image": images[0]},
                                                     {"type": "text", "text": "What is this?"}]}], max_tokens=2)
        assert reply["llava_kv"]["chat_template"] == "gemma" and reply["llava_kv"]["images_encoded"] == 1
        kinds = [c.kind for c in s.timeline if not c.generated]
        assert "image" in kinds and s.timeline[0].text.startswith("<start_of_turn>user\n")


def test_chat_template_argument_overrides_the_fallback(bare_gemma, gemma_pair):
    with lk.Model.load(bare_gemma, gemma_pair.mmproj_path) as m, m.session() as s:
        reply = s.chat(MESSAGES, max_tokens=0, chat_template="chatml")
        assert (reply["llava_kv"]["chat_template"], reply["llava_kv"]["chat_template_source"]) == ("chatml", "argument")
        assert _rendered(s)[0].startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_the_models_own_template_is_reported_as_such(gemma_pair):
    with lk.Model.load(gemma_pair.model_path, gemma_pair.mmproj_path) as m, m.session() as s:
        reply = s.chat(MESSAGES, max_tokens=0)
        assert (reply["llava_kv"]["chat_template"], reply["llava_kv"]["chat_template_source"]) == ("model", "model")


def test_no_obvious_template_is_an_error_naming_the_architecture(bare_llama, llava_pair):
    with lk.Model.load(bare_llama, llava_pair.mmproj_path) as m, m.session() as s:
        with pytest.raises(lk.LlavaKVError, match=r"architecture 'llama' does not name one; pass chat_template="):
            s.chat(MESSAGES, max_tokens=1)
        assert s.timeline == [] and s.n_past == 0
        assert s.chat(MESSAGES, max_tokens=0, chat_template="vicuna")["llava_kv"]["chat_template"] == "vicuna"


def test_batch_prompts_take_the_same_fallback(bare_gemma, gemma_pair):
    with lk.Model.load(bare_gemma, gemma_pair.mmproj_path) as m:
        assert batch.render_prompt(m, "Caption it.") == batch.render_prompt(m, "Caption it.", chat_template="gemma")
        assert batch.render_prompt(m, "Caption it.")[0] == "<start_of_turn>user\n"


def test_every_mapped_architecture_and_template_is_one_llama_cpp_knows(gemma_pair):
    assert set(ARCH_CHAT_TEMPLATES) <= TEXT_ARCHITECTURES
    with lk.Model.load(gemma_pair.model_path) as m:
        for name in sorted(set(ARCH_CHAT_TEMPLATES.values())):
            assert m._core.apply_chat_template([("user", "hi")], True, name), name
            assert choose_chat_template(m, name).template == name
        with pytest.raises(lk.LlavaKVError, match="does not support this chat template"):
            m._core.apply_chat_template([("user", "hi")], True, "no-such-template")


def test_gguf_metadata_names_architecture_and_projector_type(llava_pair, gemma_pair, tmp_path):
    assert architecture(llava_pair.model_path) == "llama" and architecture(gemma_pair.model_path) == "gemma3"
    assert architecture(llava_pair.mmproj_path) == "clip" and projector_type(llava_pair.mmproj_path) == "mlp"
    assert projector_type(gemma_pair.mmproj_path) == "gemma3" and projector_type(gemma_pair.model_path) is None
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gemma_pair.model_path.read_bytes()[:64])
    with pytest.raises(lk.ModelLoadError, match="cut.gguf"):
        architecture(cut)
