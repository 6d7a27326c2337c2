"""The device path, on whatever GPU backend the build has (Vulkan on Mesa's lavapipe in CI, CUDA where an
NVIDIA GPU is present): where the weights, the projector and the KV cache live, that closing gives every
byte back, that edits there are exact, and how far the device's logits are from the CPU's.

A Vulkan build sees lavapipe (a CPU-type Vulkan device) only with GGML_VK_VISIBLE_DEVICES=0 set before
the process starts; .ci/run does that. Without a device every test here skips, saying why.

Memory is read from the device ledger (llava_kv.device_ledger): every ggml buffer the backends allocate
or free, counted where it happens, so a buffer that outlives its model shows whatever the model says.
On lavapipe the driver's free figure moves with every process on the machine, and device memory is this
process's own memory, so the ledger and RSS are the honest measures there.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import llava_kv as lk
from llava_kv import _core
from llava_kv._core import _testing
from llava_kv.images import load_image
from llava_kv.testing import make_test_model, random_image, rss_bytes

from conftest import TINY_PRESETS, feed_timeline, write_to_terminal

GPU = next((d for d in lk.devices() if d.type in ("gpu", "igpu")), None)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(GPU is None, reason="this build sees no GPU device (backends: " +
                       ", ".join(lk.build_info()["backends"]) + "); build with CMAKE_ARGS from "
                       "scripts/vulkan_deps.sh or -DGGML_CUDA=ON, and for lavapipe set GGML_VK_VISIBLE_DEVICES=0"),
]
N_CTX = 1024
TEXTS = ["USER: look at these pictures", " first the red car", " then the green tree", " and the dog\nASSISTANT:"]

# (preset, what, figure) for the summary printed at the end of the module.
_FIGURES: list[tuple[str, str, str]] = []


@pytest.fixture(scope="module", autouse=True)
def _summary(request: pytest.FixtureRequest):
    yield
    if not _FIGURES:
        return
    lines = ["", f"test_gpu.py on {GPU.name if GPU else '-'} ({GPU.description if GPU else '-'})"]
    lines += [f"  {preset:16s} {what:34s} {figure}" for preset, what, figure in _FIGURES]
    write_to_terminal(request, lines)


def on_device(pair: Any, **kwargs: Any) -> lk.Model:
    assert GPU is not None
    return lk.Model.load(pair.model_path, pair.mmproj_path, n_gpu_layers=-1, mmproj_use_gpu=True, main_gpu=GPU.name,
                         **kwargs)


def on_cpu(pair: Any) -> lk.Model:
    return lk.Model.load(pair.model_path, pair.mmproj_path, n_gpu_layers=0, mmproj_use_gpu=False)


def ledger() -> dict[tuple[str, str, int], int]:
    """(device, component, session id) -> bytes of live buffers."""
    return {(e.device, e.component, e.session_id): e.bytes for e in lk.device_ledger()}


def on_gpu(entries: dict[tuple[str, str, int], int], component: str, session_id: int | None = None) -> int:
    assert GPU is not None
    return sum(b for (dev, comp, sid), b in entries.items()
               if dev == GPU.name and comp == component and (session_id is None or sid == session_id))


def conversation(s: lk.Session, seeds: tuple[int, ...] = (0, 1, 2)) -> None:
    s.append_text(TEXTS[0])
    for i, seed in enumerate(seeds):
        s.append_image(random_image(seed))
        s.append_text(TEXTS[1 + i % 3])


@pytest.fixture(autouse=True)
def _nothing_left_on_the_device():
    """Every test starts and ends with no live buffer on any device: a model a test forgot shows here."""
    gc.collect()
    assert lk.device_ledger() == [], "a model from an earlier test still holds device memory"
    yield
    gc.collect()
    left = [(e.device, e.component, e.bytes) for e in lk.device_ledger()]
    assert left == [], f"buffers still live after the test: {left}"


# --- one record shape ----------------------------------------------------------------------------


def test_devices_are_one_record_everywhere(llava_pair):
    assert GPU is not None and GPU.type in ("gpu", "igpu") and 0 < GPU.free <= GPU.total
    names = [d.name for d in lk.devices()]
    assert names == [d.name for d in lk.build_info()["devices"]]
    with on_device(llava_pair) as m:
        devices = m.memory()["devices"]
        assert list(devices) == names
        assert all(isinstance(d, lk.Device) for d in devices.values())
        assert set(GPU.as_dict()) == {"name", "type", "description", "free", "total", "allocated"}
        assert devices[GPU.name].allocated > 0 and devices["CPU"].type == "cpu"
        assert m.main_gpu == GPU.name


# --- seed 2: what the model, projector and sessions hold on the device comes back -----------------


def test_weights_projector_and_kv_live_on_the_device_and_come_back(llava_pair):
    m = on_device(llava_pair)
    loaded = ledger()
    mem = m.memory()
    # What the allocator saw equals what llama.cpp and mtmd say they hold there.
    assert on_gpu(loaded, "weights") == mem["weights"][GPU.name] > 0
    assert on_gpu(loaded, "projector") == mem["projector"][GPU.name] > 0
    s = m.session(n_ctx=N_CTX)
    t = m.session(n_ctx=2 * N_CTX)
    with_sessions = ledger()
    sessions = m.memory()["sessions"]
    for session in (s, t):
        sid = session._core.id
        assert on_gpu(with_sessions, "kv", sid) == sessions[sid]["kv"][GPU.name] > 0
        assert on_gpu(with_sessions, "compute", sid) == sessions[sid]["compute"][GPU.name] > 0
    assert on_gpu(with_sessions, "kv", t._core.id) == 2 * on_gpu(with_sessions, "kv", s._core.id)
    conversation(s)
    s.logits()
    encoded = ledger()
    assert on_gpu(encoded, "projector") > on_gpu(loaded, "projector")  # its compute buffers, made at the first encode
    assert lk.devices()[0].allocated == sum(b for (dev, _, _), b in encoded.items() if dev == GPU.name)
    _FIGURES.append(("tiny-llava", "device bytes: weights/projector/kv", f"{on_gpu(loaded, 'weights')} / "
                     f"{on_gpu(encoded, 'projector')} / {on_gpu(encoded, 'kv')}"))
    t.close()
    assert on_gpu(ledger(), "kv", t._core.id) == 0
    m.close()
    assert lk.device_ledger() == []
    assert next(d for d in lk.devices() if d.name == GPU.name).allocated == 0


@pytest.mark.slow
def test_load_close_cycles_give_device_memory_back(llava_pair):
    """100 cycles of load, sessions, an image encode, a generation and a batch run, all on the device."""
    cycles = 100
    rss, loaded = [], []
    for i in range(cycles):
        with on_device(llava_pair) as m:
            with m.session(n_ctx=512) as s:
                s.append_text("USER: ")
                s.append_image(random_image(i % 3))
                s.append_text(" describe\nASSISTANT:")
                s.generate(2)
                loaded.append(sum(e.bytes for e in lk.device_ledger() if e.device == GPU.name))
            records = lk.batch.run(m, [random_image(i % 5), random_image(7)], "Describe.", max_tokens=2,
                                   parallel=2, progress=False)
            assert all(r.ok for r in records)
        assert lk.device_ledger() == [], f"cycle {i + 1} left buffers behind"
        gc.collect()
        rss.append(rss_bytes())
    del m, s, records
    gc.collect()
    drift = rss[-1] - rss[1]
    _FIGURES.append(("tiny-llava", f"RSS after close, cycle 2 -> {cycles}",
                     f"{rss[1] / 2**20:.1f} -> {rss[-1] / 2**20:.1f} MiB ({drift / 2**20:+.2f})"))
    _FIGURES.append(("tiny-llava", "device bytes with a session, each cycle", f"{min(loaded)}..{max(loaded)}"))
    assert drift < 8 * 2**20
    assert _core.native_objects() == {"models": 0, "sessions": 0, "batch_runners": 0}


def test_closing_the_model_under_a_running_device_decode(llava_pair):
    m = on_device(llava_pair)
    s = m.session(n_ctx=N_CTX)
    conversation(s, (0,))
    outcome: dict[str, Any] = {}

    def edit() -> None:
        try:
            s.replace_image(s.images[0], random_image(9))
            outcome["result"] = "finished"
        except BaseException as e:  # noqa: BLE001 - inspected below
            outcome["result"] = e

    _testing.arm_decode_fault(1, "pause")
    worker = threading.Thread(target=edit)
    worker.start()
    try:
        assert _testing.wait_decode_paused(60.0), "the edit never reached its decode"
        closing = threading.Thread(target=m.close)
        closing.start()
        for _ in range(60000):
            if s._core.closing:
                break
            threading.Event().wait(0.001)
        assert s._core.closing, "close() never marked the session"
    finally:
        _testing.release_decode_pause()
        worker.join(60)
        _testing.arm_decode_fault(0, "none")
    closing.join(60)
    assert isinstance(outcome["result"], lk.ClosedError), outcome
    assert m.closed and lk.device_ledger() == []


def test_closing_the_model_under_a_running_device_batch(llava_pair):
    m = on_device(llava_pair)
    images = [random_image(100 + i) for i in range(24)]
    first = threading.Event()
    outcome: dict[str, Any] = {"records": 0}

    def consume() -> None:
        try:
            for _ in lk.batch.iter_run(m, images, "Describe.", max_tokens=16, parallel=2, progress=False):
                outcome["records"] += 1
                first.set()
            outcome["result"] = "finished"
        except BaseException as e:  # noqa: BLE001 - inspected below
            outcome["result"] = e
        finally:
            first.set()

    worker = threading.Thread(target=consume)
    worker.start()
    assert first.wait(120), "the batch produced nothing"
    m.close()
    worker.join(60)
    assert not worker.is_alive()
    assert outcome["records"] < len(images), "the batch finished before close(): nothing was interrupted"
    assert isinstance(outcome.get("result"), lk.ClosedError), outcome
    assert lk.device_ledger() == []


# --- exactness on the device ----------------------------------------------------------------------


EXACT_FAMILIES = ["tiny-llava", "tiny-qwen25vl", "tiny-gemma3"]  # llama + mlp, M-RoPE, sliding window


@pytest.mark.parametrize("preset", EXACT_FAMILIES)
def test_every_edit_on_the_device_equals_a_fresh_device_session(preset, models_dir):
    pair = make_test_model(models_dir, preset)
    with on_device(pair) as m:
        media: dict[str, np.ndarray] = {}

        def image(seed: int) -> np.ndarray:
            arr = random_image(seed)
            media[load_image(arr, m.projector_id).digest] = arr
            return arr

        worst = 0.0

        def check(s: lk.Session, what: str) -> None:
            nonlocal worst
            with m.session(n_ctx=N_CTX) as fresh:
                feed_timeline(fresh, list(s.timeline), media)
                want, got = fresh.logits(), s.logits()
            diff = float(np.abs(got - want).max())
            worst = max(worst, diff)
            assert np.array_equal(got, want), f"{preset} {what}: max |dlogit| {diff:.3e} vs a fresh device session"

        with m.session(n_ctx=N_CTX) as s:
            s.append_text(TEXTS[0])
            for i, seed in enumerate((0, 1, 2)):
                s.append_image(image(seed))
                s.append_text(TEXTS[1 + i])
            check(s, "appended")
            s.replace_image(s.images[0], image(3))
            check(s, "replace first")
            s.replace_image(s.images[-1], image(4))
            check(s, "replace last")
            s.insert_image(0, image(5))
            check(s, "insert at start")
            s.insert_image(3, image(6))
            check(s, "insert in the middle")
            s.remove_image(s.images[1])
            check(s, "remove exact")
            s.images[0] = image(7)
            check(s, "images[0] = ...")
            del s.images[-1]
            check(s, "del images[-1]")
            s.append_image(image(1))  # seen before: from the embedding cache
            s.append_text(" and again")
            check(s, "append a cached image")
            n = s.n_past
            s.truncate(len(s.timeline) - 2)
            assert s.n_past < n
            check(s, "truncate")
            s.images.clear()
            check(s, "images.clear()")
            s.append_image(image(8))
            s.append_text(" last")
            check(s, "after clear")
        _FIGURES.append((preset, "edit vs fresh on the device", f"bitwise equal (max |d| {worst:.1e})"))


# --- device vs CPU --------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_device_logits_are_close_to_the_cpus(preset, models_dir):
    pair = make_test_model(models_dir, preset)
    got = {}
    for where, load in (("device", on_device), ("cpu", on_cpu)):
        with load(pair) as m, m.session(n_ctx=N_CTX) as s:
            conversation(s, (0, 1))
            rows = [s.logits()]
            s.append_text(" one more line of text to read")
            rows.append(s.logits())
            got[where] = np.stack(rows)
    dev, cpu = got["device"], got["cpu"]
    diff = float(np.abs(dev - cpu).max())
    top2 = np.sort(cpu, axis=1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    _FIGURES.append((preset, "max |device - CPU| logits", f"{diff:.2e} (CPU top-2 margins {np.round(margins, 3)})"))
    assert diff <= 0.1
    for row, margin in enumerate(margins):
        if margin > 0.2:
            assert dev[row].argmax() == cpu[row].argmax(), f"{preset}: argmax differs at a margin of {margin:.3f}"


# --- the batch runner, a session pool and the server, each on the device --------------------------


def test_batch_runner_runs_on_the_device(llava_pair):
    with on_device(llava_pair) as m:
        seen: list[int] = []
        records = []
        for record in lk.batch.iter_run(m, [random_image(i) for i in range(3)], "Describe.", max_tokens=4,
                                        parallel=2, progress=False):
            seen.append(on_gpu(ledger(), "kv"))
            records.append(record)
        assert [r.ok for r in records] == [True] * 3 and all(r.tokens > 0 for r in records)
        assert min(seen) > 0, "the batch runner's KV cache was not on the device"


def test_session_pool_runs_on_the_device(llava_pair):
    from llava_kv.pool import Generation

    with on_device(llava_pair) as m:
        with m.session(n_ctx=N_CTX) as lone:
            conversation(lone, (0,))
            want = lone.generate(6)
        with m.session_pool(2, n_ctx=N_CTX) as pool:
            assert on_gpu(ledger(), "kv") > 0
            for slot in pool:
                conversation(slot, (0,))
            gens = [Generation(slot, 6) for slot in pool]
            while not all(g.done for g in gens):
                pool.step([g for g in gens if not g.done])
            assert [g.text for g in gens] == [want, want]


def test_server_runs_on_the_device(llava_pair):
    pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from llava_kv.server.process import ServerProcess

    messages = [{"role": "user", "content": "Hello there, what do you see?"}]
    with on_device(llava_pair) as m, m.session(n_ctx=2048) as s:
        want = s.chat(messages, max_tokens=6, temperature=0)["choices"][0]["message"]["content"]
    args = ["--slots", "1", "--n-ctx", "2048", "--n-gpu-layers", "-1", "--main-gpu", GPU.name]
    with ServerProcess(llava_pair.model_path, llava_pair.mmproj_path, args=args) as srv:
        client = srv.client()
        reply = client.chat.completions.create(model=os.path.basename(llava_pair.model_path), messages=messages,
                                               max_tokens=6, temperature=0)
        assert reply.choices[0].message.content == want
        status, _, body = srv.get("/metrics")
        assert status == 200


# --- what does not fit is refused, with nothing leaked and the process alive -----------------------


def test_a_context_the_device_cannot_take_is_refused(llava_pair):
    with on_device(llava_pair) as m:
        before = ledger()
        for n_ctx in (20_000_000, 200_000_000):
            with pytest.raises(lk.ContextFullError, match=GPU.name) as info:
                m.session(n_ctx=n_ctx)
            assert info.value.needed >= n_ctx and info.value.available < n_ctx
            assert ledger() == before
        with pytest.raises(lk.ContextFullError, match=GPU.name):
            m.session_pool(4, n_ctx=5_000_000)
        assert ledger() == before
        with m.session(n_ctx=512) as s:  # the process and the model carry on
            conversation(s, (0,))
            assert s.logits().shape == (m.n_vocab,)


def test_a_projector_the_device_cannot_take_is_refused(llava_pair, tmp_path):
    if not GPU.name.startswith("Vulkan"):
        pytest.skip("only ggml-vulkan can be told a smaller buffer limit (GGML_VK_FORCE_MAX_*_SIZE)")
    script = textwrap.dedent(f"""
        import llava_kv as lk
        try:
            lk.Model.load({str(llava_pair.model_path)!r}, {str(llava_pair.mmproj_path)!r}, main_gpu={GPU.name!r})
        except lk.ModelLoadError as e:
            print("refused:", e)
        assert lk.device_ledger() == [], lk.device_ledger()
        with lk.Model.load({str(llava_pair.model_path)!r}, {str(llava_pair.mmproj_path)!r},
                           mmproj_use_gpu=False) as m, m.session(n_ctx=256) as s:
            s.append_text("USER: ")
            s.append_image(lk.testing.random_image(0))
            s.append_text(" hi")
            print("cpu projector ok", s.logits().shape)
    """)
    limit = 16 * 1024  # bytes: smaller than the projector's largest tensor
    env = dict(os.environ, GGML_VK_FORCE_MAX_ALLOCATION_SIZE=str(limit), GGML_VK_FORCE_MAX_BUFFER_SIZE=str(limit))
    proc = subprocess.run([sys.executable, "-c", "import llava_kv.testing\n" + script], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused:" in proc.stdout and GPU.name in proc.stdout and f"({limit} bytes per buffer)" in proc.stdout, \
        proc.stdout
    assert "cpu projector ok" in proc.stdout


def test_vram_release_benchmark_runs_on_the_device(tmp_path):
    out = tmp_path / "vram.json"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "scenarios" / "vram_release.py"),
                           "--cycles", "5", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"]["name"] == GPU.name
    assert report["ledger_after_close_bytes"] == [0] * 5
    assert all(c["ledger_loaded_bytes"][GPU.name] > 0 for c in report["cycles"])
