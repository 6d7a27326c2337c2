import argparse
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import llava_kv as lk
from llava_kv.cli import build_parser, expand_paths, main
from llava_kv.testing import PRESETS, make_test_model


def _run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "llava_kv", *args], capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="session")
def image_files(tmp_path_factory, images):
    """Three PNG files of the shared test images."""
    folder = tmp_path_factory.mktemp("cli-images")
    paths = []
    for i in range(3):
        path = folder / f"img{i}.png"
        Image.fromarray(images[i]).save(path)
        paths.append(str(path))
    return paths


def _model_args(pair):
    return ["--model", str(pair.model_path), "--mmproj", str(pair.mmproj_path)]


# -- existing commands ------------------------------------------------------------------------------


def test_make_test_model_cli(tmp_path):
    result = _run("make-test-model", "--preset", "tiny-gemma3", "--out", str(tmp_path), "--seed", "2")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["preset"] == "tiny-gemma3" and out["image_tokens"] == 9 and "random weights" in out["note"]
    assert (tmp_path / "tiny-gemma3-s2.gguf").is_file() and (tmp_path / "tiny-gemma3-s2-mmproj.gguf").is_file()


def test_demo_runs_end_to_end_and_says_weights_are_random(tmp_path):
    result = _run("demo", env={"LLAVA_KV_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "RANDOM" in result.stdout
    assert "replace_image" in result.stdout and "embed cache hits 1" in result.stdout
    assert "model.closed=True" in result.stdout


def test_info_reports_build_and_model(llava_pair):
    result = _run("info", *_model_args(llava_pair))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["build"]["llama_cpp_commit"].startswith("0c1e5709")
    assert info["version"] == lk.__version__
    assert info["model"]["has_vision"] is True and info["model"]["memory"]["weights"]["CPU"] > 0
    assert info["model"]["n_vocab"] == llava_pair.preset.n_vocab and info["model"]["chat_template"]


def test_cache_types_of_k_and_v_apart(tmp_path):
    import dataclasses

    pair = make_test_model(tmp_path, dataclasses.replace(PRESETS["tiny-llava"], name="heads32", n_head=2, n_head_kv=1))
    result = _run("info", *_model_args(pair), "--cache-type-k", "q8_0", "--flash-attn", "off")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"]["kv_type"] == ["q8_0", "f16"]  # K alone needs no flash attention
    result = _run("info", *_model_args(pair), "--kv-type", "q4_0", "--cache-type-v", "f16")
    assert result.returncode == 0 and json.loads(result.stdout)["model"]["kv_type"] == ["q4_0", "f16"]
    result = _run("info", *_model_args(pair), "--cache-type-v", "q8_0", "--flash-attn", "off")
    assert result.returncode != 0 and "a q8_0 V cache (kv_type='f16/q8_0') needs flash attention" in result.stderr


@pytest.mark.parametrize("preset", [name for name in PRESETS if name.startswith("tiny-")])
def test_info_names_family_and_projector_type(models_dir, capsys, preset):
    pair = make_test_model(models_dir, preset)
    assert main(["info", *_model_args(pair)]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    # what the files say (general.architecture, clip.projector_type), not what the preset meant to write
    assert model["family"] == pair.preset.arch and model["projector_type"] == pair.preset.projector
    assert model["chat_template_used"] == {"name": "model", "source": "model"}


def test_info_of_a_text_model_has_no_projector_type(llava_pair, capsys):
    assert main(["info", "--model", str(llava_pair.model_path)]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert model["family"] == "llama" and model["projector_type"] is None and model["has_vision"] is False


def test_info_without_model_reports_the_build(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "model" not in info and info["build"]["llama_cpp_commit"].startswith("0c1e5709")


# -- help -------------------------------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_help_of_every_command_describes_every_option(capsys):
    commands = _subparsers(build_parser())
    assert {"run", "chat", "batch", "info", "demo", "make-test-model"} <= set(commands)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    top = capsys.readouterr().out
    assert all(name in top for name in commands)
    for name, sub in commands.items():
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: llava-kv {name}") and sub.description and "examples:" in text, name
        for action in sub._actions:
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help text"
            for option in action.option_strings:
                assert re.search(rf"(^|[\s,]){re.escape(option)}\b", text), f"{name} --help does not show {option}"


def test_help_texts_via_the_entry_point():
    for args in (["--help"], ["run", "--help"], ["chat", "--help"], ["batch", "--help"], ["info", "--help"],
                 ["make-test-model", "--help"]):
        result = _run(*args)
        assert result.returncode == 0 and "usage:" in result.stdout, args


def test_chat_help_lists_the_repl_commands(capsys):
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    text = capsys.readouterr().out
    for command in ("/image PATH", "/replace I PATH", "/remove I", "/clear", "/memory", "/stats", "/quit"):
        assert command in text


# -- run --------------------------------------------------------------------------------------------


def _reference_reply(pair, messages, max_tokens):
    with lk.Model.load(pair.model_path, pair.mmproj_path) as model, model.chat_session(n_ctx=4096, seed=0) as s:
        return s.chat(messages, max_tokens=max_tokens)


def test_run_streams_the_greedy_reply(pair, image_files, capsys):
    messages = [{"role": "user", "content": [{"type": "image", "image": image_files[0]},
                                             {"type": "text", "text": "What is in this picture?"}]}]
    want = _reference_reply(pair, messages, 12)["choices"][0]["message"]["content"]
    assert want
    assert main(["run", *_model_args(pair), "--image", image_files[0], "--prompt", "What is in this picture?",
                 "--max-tokens", "12"]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert main(["run", *_model_args(pair), "--image", image_files[0], "--prompt", "What is in this picture?",
                 "--max-tokens", "12", "--no-stream"]) == 0
    assert capsys.readouterr().out == want + "\n"


def test_run_json_with_system_and_two_images(llava_pair, image_files, capsys):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image", "image": image_files[0]},
                                             {"type": "image", "image": image_files[1]},
                                             {"type": "text", "text": "Compare."}]}]
    want = _reference_reply(llava_pair, messages, 6)
    assert main(["run", *_model_args(llava_pair), "--image", image_files[0], "--image", image_files[1],
                 "--system", "Be brief.", "--prompt", "Compare.", "--max-tokens", "6", "--json", "--stats"]) == 0
    captured = capsys.readouterr()
    reply = json.loads(captured.out)
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]
    assert reply["usage"] == want["usage"] and reply["llava_kv"]["images_encoded"] == 2
    assert f"prompt {want['usage']['prompt_tokens']} tokens" in captured.err


def test_run_reads_the_prompt_from_stdin(llava_pair, image_files, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Describe."))
    assert main(["run", *_model_args(llava_pair), "--image", image_files[2], "--prompt", "-", "--max-tokens", "5"]) == 0
    messages = [{"role": "user", "content": [{"type": "image", "image": image_files[2]},
                                             {"type": "text", "text": "Describe."}]}]
    assert capsys.readouterr().out == _reference_reply(llava_pair, messages, 5)["choices"][0]["message"]["content"] + "\n"


def test_run_without_a_model_uses_a_test_pair_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLAVA_KV_CACHE_DIR", str(tmp_path))
    assert main(["run", "--prompt", "Hello", "--max-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert "RANDOM" in captured.err and captured.out.endswith("\n")
    assert list((tmp_path / "test-models").glob("tiny-llava-*.gguf"))


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model.gguf"], "model file not found"),
    (["--mmproj", "/no/such/mmproj.gguf"], "--mmproj needs --model"),
    (["--image", "/no/such/image.png"], "image file not found"),
])
def test_run_usage_errors_exit_2(llava_pair, capsys, args, message):
    if "--image" in args:
        args = [*_model_args(llava_pair), *args]
    assert main(["run", *args, "--prompt", "x"]) == 2
    assert message in capsys.readouterr().err


def test_run_image_needs_a_projector(llava_pair, image_files, capsys):
    assert main(["run", "--model", str(llava_pair.model_path), "--image", image_files[0], "--prompt", "x"]) == 2
    assert "--mmproj" in capsys.readouterr().err


def test_run_unreadable_image_is_a_clean_error(llava_pair, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    assert main(["run", *_model_args(llava_pair), "--image", str(bad), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "bad.png" in err and "Traceback" not in err


# -- chat -------------------------------------------------------------------------------------------


def _chat(pair, monkeypatch, capsys, script, *extra):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in script)))
    rc = main(["chat", *_model_args(pair), "--max-tokens", "6", *extra])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


COST = re.compile(r"^\[(?P<what>[^:\]\n]+): re-decoded (?P<decoded>\d+) of (?P<total>\d+) tokens, "
                  r"encoded (?P<encoded>\d+) image", re.M)
TURN = re.compile(r"\[reply (?P<reply>\d+) tokens \((?P<finish>\w+)\); prompt: (?P<decoded>\d+) tokens decoded, "
                  r"(?P<reused>\d+) reused, (?P<encoded>\d+) image\(s\) encoded\]")


def test_chat_edits_images_through_the_registry(pair, image_files, monkeypatch, capsys):
    a, b, c = image_files
    script = ["Hello there.", f"/image {a}", "Describe this.", f"/image {b}", "And this one?",
              f"/replace 0 {c}", "What changed?", "/images", "/remove 1", f"/replace 0 {a}", "Again?", "/clear",
              "/images", "/memory", "/stats", "/quit", "never sent"]
    rc, out, err = _chat(pair, monkeypatch, capsys, script)
    assert rc == 0, err
    assert "error" not in err
    turns = [m.groupdict() for m in TURN.finditer(out)]
    costs = [m.groupdict() for m in COST.finditer(out)]
    assert len(turns) == 5, out  # "never sent" came after /quit
    assert [t["encoded"] for t in turns] == ["0", "1", "1", "0", "0"]
    assert [cost["what"] for cost in costs] == ["replaced image 0", "removed image 1", "replaced image 0", "cleared 1 image(s)"]
    replace, remove, replace_back, clear = costs
    # the replace re-decoded from the first image on, not the whole conversation, and encoded the new image
    assert 0 < int(replace["decoded"]) < int(replace["total"]) and replace["encoded"] == "1"
    # the next turn found the conversation as the replace left it: it decoded only the new message
    assert int(turns[3]["reused"]) == int(replace["total"]) and int(turns[3]["decoded"]) < int(replace["decoded"])
    assert 0 < int(remove["decoded"]) < int(remove["total"])
    # the first image's embedding was still cached: replacing back encodes nothing
    assert replace_back["encoded"] == "0" and "1 from the embedding cache" in out
    assert int(turns[4]["reused"]) == int(replace_back["total"])
    assert 0 < int(clear["decoded"]) < int(clear["total"])
    with lk.Model.load(pair.model_path, pair.mmproj_path) as m, m.session(n_ctx=4096) as s:
        s.append_text("x")  # not the first chunk, which would also carry BOS
        cells = s.append_image(c).n_tokens  # what the listing must say for the image now first
    assert f"  0: {c}, {cells} tokens" in out
    assert f"  1: {b}, " in out and "[no images]" in out
    assert re.search(r"weights\s+CPU\s+[\d.]+ (KiB|MiB)", out) and re.search(r"total\s+CPU", out)
    assert re.search(r"n_past \d+ of n_ctx 4096, 0 image\(s\)", out) and "images_encoded 3" in out


def test_chat_bad_input_is_reported_and_the_conversation_goes_on(llava_pair, image_files, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    script = ["/bogus", "/image /no/such/file.png", f"/image {bad}", "/image", f"/replace 0 {image_files[0]}",
              "/replace x y", "/replace 0", "/remove", "/remove 3", f"/image {image_files[0]}",
              f"/replace 0 {bad}", "/remove 0", "Hello", "//slash at the start", "/quit"]
    result = _run("chat", *_model_args(llava_pair), "--max-tokens", "4",
                  input="".join(line + "\n" for line in script))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 10, result.stderr
    assert "unknown command /bogus" in errors[0] and "/no/such/file.png" in errors[1] and "notes.txt" in errors[2]
    assert "no image 0" in errors[4] and "must be a number" in errors[5] and "no image 3" in errors[8]
    assert "notes.txt" in errors[9]
    turns = [m.groupdict() for m in TURN.finditer(result.stdout)]
    # the attached image was removed before it was sent: neither message encoded an image
    assert len(turns) == 2 and all(t["encoded"] == "0" for t in turns)
    assert "[removed attached image 0]" in result.stdout


def test_chat_ends_at_end_of_input_and_keeps_the_system_message(llava_pair, image_files, monkeypatch, capsys):
    rc, out, err = _chat(llava_pair, monkeypatch, capsys, ["Hi"], "--system", "Be brief.", "--image", image_files[0])
    assert rc == 0, err
    (turn,) = TURN.findall(out)
    assert "[image 0 attached" in out and turn[4] == "1"


def test_chat_reset_starts_over(llava_pair, monkeypatch, capsys):
    rc, out, _ = _chat(llava_pair, monkeypatch, capsys, ["Hi", "/reset", "/stats", "Hi"])
    assert rc == 0
    assert "n_past 0 of n_ctx" in out
    first, second = [m.groupdict() for m in TURN.finditer(out)]
    assert second["reused"] == "0" and second["decoded"] == first["decoded"]


# -- batch: paths -----------------------------------------------------------------------------------


def _write_png(path: Path, seed: int, images) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(images[seed % len(images)]).save(path, format="PNG")
    return str(path)


def test_expand_paths_folders_globs_files(tmp_path, images):
    root = tmp_path / "photos"
    b = _write_png(root / "b.png", 0, images)
    a = _write_png(root / "A.JPG", 1, images)  # case-insensitive extension (PNG data: only names matter here)
    nested = _write_png(root / "sub" / "c.webp", 2, images)
    (root / "notes.txt").write_text("x")
    (root / ".hidden.png").write_bytes(b"x")
    other = _write_png(tmp_path / "other" / "d.png", 3, images)
    (tmp_path / "other" / "e.txt").write_text("x")

    paths, unmatched, missing = expand_paths([str(root)])
    assert paths == [a, b, nested] and not unmatched and not missing

    paths, unmatched, missing = expand_paths([str(tmp_path / "**" / "*.png"), str(root), b, str(tmp_path / "*.gif"),
                                              str(tmp_path / "gone.png"), str(tmp_path / "other" / "e.txt")])
    assert paths == [other, b, a, nested, str(tmp_path / "gone.png"), str(tmp_path / "other" / "e.txt")]
    assert unmatched == [str(tmp_path / "*.gif")] and missing == [str(tmp_path / "gone.png")]

    paths, _, _ = expand_paths([str(tmp_path / "o*")])  # a glob matching a folder expands it
    assert paths == [other]


def test_batch_usage_errors(llava_pair, tmp_path, capsys, images):
    out = tmp_path / "out.jsonl"
    (tmp_path / "empty").mkdir()
    assert main(["batch", *_model_args(llava_pair), "--prompt", "x", "--out", str(out), str(tmp_path / "empty"),
                 str(tmp_path / "*.png")]) == 2
    assert "no PATH matched" in capsys.readouterr().err
    img = _write_png(tmp_path / "a.png", 0, images)
    assert main(["batch", "--model", str(tmp_path / "missing.gguf"), "--mmproj", str(llava_pair.mmproj_path),
                 "--prompt", "x", "--out", str(out), img]) == 2
    assert "model file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["batch", "--prompt", "x", img])  # --model and --mmproj are required
    assert exit_info.value.code == 2
    assert not out.exists()


# -- batch: runs (need llava_kv.batch) --------------------------------------------------------------


@pytest.fixture()
def batch_folder(tmp_path, images):
    folder = tmp_path / "in"
    for i in range(3):
        _write_png(folder / f"img{i}.png", i, images)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _batch(pair, out, *paths, extra=()):
    return main(["batch", *_model_args(pair), "--prompt", "Describe the image.", "--max-tokens", "4",
                 "--out", str(out), "--no-progress", *extra, *map(str, paths)])


def test_batch_writes_one_line_per_image_and_resumes(llava_pair, batch_folder, tmp_path, capsys, images):
    out = tmp_path / "results" / "out.jsonl"
    assert _batch(llava_pair, out, batch_folder) == 0
    assert "3 ok, 1 failed, 0 skipped" in capsys.readouterr().err
    lines = _lines(out)
    assert [Path(r["image"]).name for r in lines] == ["broken.png", "img0.png", "img1.png", "img2.png"]
    for r in lines:
        assert set(r) >= {"image", "text", "tokens", "finish_reason", "cached", "timings", "error"}
    broken, *good = lines
    assert isinstance(broken["error"], str) and broken["error"] and broken["text"] is None
    assert all(r["error"] is None and isinstance(r["text"], str) and r["tokens"] > 0 for r in good)

    # the same command again: everything is in the file already
    size = out.stat().st_size
    assert _batch(llava_pair, out, batch_folder) == 0
    assert "0 ok, 0 failed, 4 skipped" in capsys.readouterr().err
    assert out.stat().st_size == size

    # a new image in the folder: only it runs
    _write_png(batch_folder / "img3.png", 3, images)
    assert _batch(llava_pair, out, batch_folder) == 0
    assert "1 ok, 0 failed, 4 skipped" in capsys.readouterr().err
    assert len(_lines(out)) == 5

    # the broken file fixed, --retry-errors: it runs again and its error line is replaced
    _write_png(batch_folder / "broken.png", 4, images)
    assert _batch(llava_pair, out, batch_folder, extra=["--retry-errors"]) == 0
    assert "1 ok, 0 failed, 4 skipped" in capsys.readouterr().err
    lines = _lines(out)
    assert len(lines) == 5 and all(r["error"] is None for r in lines)
    assert sorted(Path(r["image"]).name for r in lines) == ["broken.png", "img0.png", "img1.png", "img2.png", "img3.png"]


def test_batch_recovers_from_a_cut_off_last_line(llava_pair, batch_folder, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    images = sorted(str(p) for p in batch_folder.glob("img*.png"))
    assert _batch(llava_pair, out, *images) == 0
    capsys.readouterr()
    data = out.read_bytes()
    out.write_bytes(data[: len(data) - 20])  # an interrupted run: the last record is half-written
    assert _batch(llava_pair, out, *images) == 0
    assert "1 ok, 0 failed, 2 skipped" in capsys.readouterr().err
    lines = _lines(out)
    assert [r["image"] for r in lines] == images and all(r["error"] is None for r in lines)


def test_batch_contract_via_the_console_script(llava_pair, batch_folder, tmp_path):
    out = tmp_path / "results.jsonl"
    files = [str(batch_folder / "img0.png"), str(batch_folder / "broken.png")]
    result = _run("batch", "--model", str(llava_pair.model_path), "--mmproj", str(llava_pair.mmproj_path),
                  "--prompt", "Caption:", "--max-tokens", "3", "--out", str(out), *files,
                  str(batch_folder / "img[12].png"), "--no-progress", "--parallel", "2", "--stop", "\n")
    assert result.returncode == 0, result.stderr
    lines = _lines(out)
    assert [r["image"] for r in lines] == [*files, str(batch_folder / "img1.png"), str(batch_folder / "img2.png")]
    assert [bool(r["error"]) for r in lines] == [False, True, False, False]
    assert "3 ok, 1 failed, 0 skipped" in result.stderr


def test_batch_to_stdout(llava_pair, batch_folder, capsys):
    assert main(["batch", *_model_args(llava_pair), "--prompt", "x", "--max-tokens", "2", "--no-progress",
                 str(batch_folder / "img0.png"), str(batch_folder / "img1.png")]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [Path(r["image"]).name for r in lines] == ["img0.png", "img1.png"]
    assert "2 ok, 0 failed, 0 skipped" in captured.err
