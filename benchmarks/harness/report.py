"""Plots (PNG, matplotlib) and the README results table, both made from results.json alone, so that
``--readme`` can rebuild the table from every committed run."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from benchmarks.harness.machine import label

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
TITLES = {
    "control": "control: turn 1, identical work",
    "multi_turn": "multi-turn chat, one image (turns 2..N)",
    "replace_first_image": "replace the first image, never seen",
    "replace_middle_image": "replace the middle image, never seen",
    "replace_last_image": "replace the last image, never seen",
    "readd_image": "re-add a seen image",
    "new_conversation": "a seen image in a new conversation",
    "batch": "batch captioning",
    "token_overhead": "per-token generation cost",
    "load_close": "load/close cycles, memory drift",
    "build_time": "build from scratch",
    "serve_multi_turn": "server: multi-turn chat over HTTP (turns 2..N)",
    "serve_replace_first_image": "server: replace the first image, never seen",
    "serve_new_conversation": "server: a seen image in a new conversation",
    "serve_concurrency": "server: 16 conversations into 4 slots",
    "serve_http_overhead": "server: HTTP cost over the in-process call",
    "serve_restore": "server: restore an evicted conversation (limit: prefill it)",
    "blend": "replace the first image, mode='blend' k=32 (limit: the exact edit)",
}
PEERS = (("peer", "llama-cpp-python"), ("server", "llama-server"))
OURS, LIMIT, PEER, SERVER, OTHER = "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#7f7f7f"


# --- plots -----------------------------------------------------------------------------------


def _bars(ax: Any, labels: list[str], values: list[Optional[float]], colors: list[str], unit: str) -> None:
    shown = [(l, v, c) for l, v, c in zip(labels, values, colors) if v is not None]
    if not shown:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        return
    names, vals, cols = zip(*shown)
    bars = ax.bar(names, vals, color=cols)
    for bar, v in zip(bars, vals):
        ax.annotate(_num(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylabel(unit)
    ax.tick_params(axis="x", labelsize=8)


def plot_all(results: dict[str, Any], out: Path) -> list[str]:
    """Write the plots into ``out``; returns their file names (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    sc = results["scenarios"]
    subtitle = f"{results['preset']} preset ({results['model']['preset']}), {label(results['machine'])}"
    written = []

    def save(fig: Any, name: str, title: str) -> None:
        fig.suptitle(f"{title}\n{subtitle}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    mt = sc["multi_turn"]
    if mt["ours"] is not None:
        d = mt["details"]
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        turns = list(range(1, len(d["ours_s"]) + 1))
        ax.plot(turns, d["ours_s"], "o-", color=OURS, label="llava-kv")
        ax.plot(turns[1:], d["limit_s"][1:], "s--", color=LIMIT, label="limit: new turn only")
        if d.get("peer_s"):
            ax.plot(turns, d["peer_s"], "^-", color=PEER, label="llama-cpp-python")
        if d.get("server_s"):
            ax.plot(turns, d["server_s"], "v-", color=SERVER, label="llama-server")
        ax.set_xlabel("turn")
        ax.set_ylabel("seconds")
        ax.set_xticks(turns)
        ax.legend(fontsize=8)
        save(fig, "multi_turn.png", "Multi-turn chat with one image: seconds per turn")

    edits = [k for k in ("replace_first_image", "replace_middle_image", "replace_last_image")
             if k in sc and sc[k]["ours"] is not None]
    if edits:
        fig, axes = plt.subplots(1, len(edits), figsize=(max(6.4, 4.6 * len(edits)), 3.8), squeeze=False)
        for ax, k in zip(axes[0], edits):
            e = sc[k]
            _bars(ax, ["llava-kv", "llava-kv\ncached", "limit", "fresh\nprefill", "llama-cpp-\npython",
                       "llama-\nserver"],
                  [e["ours"], e["details"].get("cached_replacement_ms"), e["limit"], e["details"]["fresh_prefill_ms"],
                   e["peer"], e.get("server")], [OURS, OTHER, LIMIT, OTHER, PEER, SERVER], "ms")
            ax.set_title(TITLES[k], fontsize=9)
        tokens = sc[edits[0]]["details"].get("conversation_tokens")
        save(fig, "edits.png", f"Replacing one of 3 images in a {tokens}-token conversation with a never-seen image")

    b = sc["batch"]
    if b["ours"] is not None:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        _bars(ax, ["llava-kv\nbatch.run", "limit\n(estimate)", "llama-cpp-python\nloop", "llama-server\nslots"],
              [b["ours"], b["limit"], b["peer"], b.get("server")], [OURS, LIMIT, PEER, SERVER],
              "images/s (higher is better)")
        save(fig, "batch.png", "Batch captioning throughput")

    t = sc["token_overhead"]
    if t["ours"] is not None:
        ms = t["details"]["ms_per_token"]
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        source = t["details"].get("limit_source")
        _bars(ax, ["C++ loop\n(batch)", "native step\nfrom Python", "generate()", "generate\n(stream)",
                   "llama-cpp-\npython", "llama-\nserver"],
              [ms.get("cpp_loop"), ms.get("native_step"), ms.get("text"), ms.get("stream"), t["peer"], t.get("server")],
              [LIMIT if source == "cpp_loop" else OTHER, LIMIT if source == "native_step" else OTHER, OTHER, OURS,
               PEER, SERVER], "ms per token (green: the limit)")
        save(fig, "token_overhead.png", "Per-token generation cost")

    lc = sc["load_close"]
    if lc["ours"] is not None:
        series = [("ours", "llava-kv", OURS), ("peer", "llama-cpp-python", PEER)]
        gpu = any((lc["details"].get(w) or {}).get("gpu_mib") for w, _, _ in series)
        fig, axes = plt.subplots(1, 2 if gpu else 1, figsize=(10 if gpu else 6.4, 3.6), squeeze=False)
        for ax, key, what in zip(axes[0], ("rss_mib", "gpu_mib"), ("RSS", "GPU memory")):
            for who, name, color in series:
                run = lc["details"].get(who) or {}
                values = run.get(key)
                if values:
                    drift = _num(run.get(key.replace("_mib", "_drift_mib")))
                    band = run.get(key.replace("_mib", "_noise_mib"))
                    noise = f", band {_num(band)} MiB" if band is not None else ""
                    ax.plot(range(1, len(values) + 1), [v - values[0] for v in values], color=color,
                            label=f"{name} (drift {drift} MiB{noise})")
            ax.axhline(0, color=LIMIT, linestyle="--", linewidth=1, label="limit: 0")
            ax.set_xlabel("cycle")
            ax.set_ylabel(f"{what} after close, MiB vs cycle 1")
            ax.legend(fontsize=8)
        save(fig, "load_close.png", "Memory after each load/close cycle")

    bt = sc["build_time"]
    if bt["ours"] is not None:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        _bars(ax, ["llava-kv", "limit:\nllama.cpp libs", "llama-cpp-\npython", "llama-server\n(one target)"],
              [bt["ours"], bt["limit"], bt["peer"], bt.get("server")], [OURS, LIMIT, PEER, SERVER], "seconds")
        save(fig, "build_time.png", "Wheel build from a clean build folder")
    return written


# --- table -----------------------------------------------------------------------------------


def _num(x: Optional[float]) -> str:
    if x is None:
        return "n/a"
    if float(x).is_integer() and abs(x) < 1000:
        return str(int(x))
    a = abs(x)
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _ratio(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _vs_limit(e: dict[str, Any]) -> str:
    r = e["ratios"]
    if r.get("ours_vs_limit") is not None:
        return _ratio(r["ours_vs_limit"])
    if r.get("ours_minus_limit") is not None:
        return f"+{_num(r['ours_minus_limit'])}"
    return "n/a"


def _figure(e: dict[str, Any], key: str) -> str:
    if e.get(key) is None:
        return f"n/a ({e['reasons'].get(key, '')})"
    text = _num(e[key])
    if key == "ours" and e["unit"].startswith("MiB") and e["details"].get("noise_mib", {}).get("ours") is not None:
        text += f" (band {_num(e['details']['noise_mib']['ours'])})"
    if key == "peer" and e["unit"].startswith("MiB") and e["details"].get("noise_mib", {}).get("peer") is not None:
        text += f" (band {_num(e['details']['noise_mib']['peer'])})"
    return text


def _note(key: str, e: dict[str, Any], results: Optional[dict[str, Any]] = None) -> str:
    """Which peer wins (and why, from the entry's notes), the control verdicts, the cached edit."""
    parts = []
    if key == "control":
        verdicts = e["details"].get("verdict", {})
        parts += [v["says"] for v in verdicts.values() if v.get("says")]
        server = verdicts.get("server") or {}
        if server.get("agree") is False and not server.get("settings_that_differ") and results:
            # the one runtime on another llama.cpp: say so, beside the one on ours
            peer = verdicts.get("peer") or {}
            text = (f"llama-server is a newer llama.cpp ({results.get('server_version') or 'b11434'}) than ours "
                    f"(`{str(results.get('llama_cpp_commit'))[:8]}`)")
            if peer.get("ratio") is not None:
                text += f"; llama-cpp-python, on our commit, reads {peer['ratio']}x"
            text += ("; the version is not the gap: scenarios/server_versions.py measured llama-server's image "
                     "encode and prefill at our commit within 6 % of b11434's (results/server_versions-*.json)")
            parts.append(text)
            calls = ((results.get("scenarios") or {}).get("multi_turn") or {}).get("details", {}).get("server_calls")
            reused = (calls or [{}])[0].get("prompt_reused")
            if reused:
                parts.append(f"(in this run its turn 1 also reused {reused} prompt tokens, the system message of "
                             "its warm-up conversation, from its prompt cache)")
    if key.startswith("replace_") and e["details"].get("cached_replacement_ms") is not None:
        cached = e["details"]["cached_replacement_ms"]
        parts.append(f"cached replacement: {_num(cached)} ms "
                     f"(its limit {_num(e['details'].get('cached_replacement_limit_ms'))})")
        if e["ours"] is not None and cached > e["ours"]:
            load = (e.get("load_average") or {}).get("before")
            parts.append("the cached figures exceed the never-seen ones: taken while other jobs loaded the machine "
                         f"(load average {load} on 2 cores), noise rather than a cost; every repetition is in details")
    if e["unit"].startswith("MiB"):
        parts.append("absolute drift; a drift inside the band is noise, no ratio of two noises is shown")
    for side, name in PEERS:
        ratio = e["ratios"].get(f"{side}_vs_ours")
        if key != "control" and ratio is not None and ratio < 1:
            why = e.get("notes", {}).get(side)
            cached = e["details"].get("cached_replacement_ms")
            if not why and side == "server" and key.startswith("replace_") and cached is not None:
                # the cached edit splits ours into the encode and the rest; the cause is not the llama.cpp
                # version (scenarios/server_versions.py: llama-server at our pin encodes and prefills
                # within 6 % of b11434's)
                why = (f"our encode is about {_num(e['ours'] - cached)} ms of our {_num(e['ours'])} ms, the rest "
                       f"(the invalidated suffix's decode) {_num(cached)} ms; its whole edit {_num(e['server'])} ms; "
                       "not the newer llama.cpp (llama-server built at our pin encodes and prefills within 6 % of "
                       "it: benchmarks/README.md); not explained yet")
            parts.append(f"**{name} wins** ({_ratio(ratio)})" + (f": {why}" if why else ""))
    return "; ".join(parts)


def table(results: dict[str, Any]) -> str:
    """A Markdown table of the headline figures of one run: one column per peer."""
    rows = ["| scenario | unit | llava-kv | limit | llama-cpp-python | llama-server | llava-kv vs limit | "
            "llama-cpp-python vs llava-kv | llama-server vs llava-kv | note |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for key, e in results["scenarios"].items():
        r = e["ratios"]
        if e["ours"] is None:
            rows.append(f"| {TITLES.get(key, key)} | {e['unit']} | {e['reasons'].get('ours', 'n/a')} | | | | | | | |")
            continue
        limit = _num(e["limit"]) if e["limit"] is not None else "n/a"
        rows.append(f"| {TITLES.get(key, key)} | {e['unit']} | {_figure(e, 'ours')} | {limit} | "
                    f"{_figure(e, 'peer')} | {_figure(e, 'server')} | {_vs_limit(e)} | "
                    f"{_ratio(r.get('peer_vs_ours'))} | {_ratio(r.get('server_vs_ours'))} | {_note(key, e, results)} |")
    return "\n".join(rows)


def settings_line(results: dict[str, Any]) -> str:
    s = results.get("settings") or {}
    if not s:
        return ""
    return (f"Settings, the same on every side (recorded per scenario under `settings`): flash attention "
            f"{s.get('flash_attn')}, {s.get('threads')} threads (generation and batches), n_batch {s.get('n_batch')}, "
            f"n_ubatch {s.get('n_ubatch')}, KV cache {s.get('kv_type')}, OMP_WAIT_POLICY={s.get('omp_wait_policy')}, "
            "n_ctx 4096 per conversation (batch: 1024 per image); greedy, repeat penalty 1.")


def readme_block(results_dir: Path, root: Path) -> str:
    parts = [BEGIN,
             "<!-- generated by `python -m benchmarks ... --readme` from benchmarks/results/*/results.json; "
             "do not edit by hand -->"]
    runs = sorted(results_dir.glob("*/results.json"))
    if not runs:
        parts.append("No results yet: run `python -m benchmarks --preset realistic --out benchmarks/out --readme`.")
    for path in runs:
        results = json.loads(path.read_text())
        m = results["model"]
        rel = path.parent.relative_to(root).as_posix()
        parts += [
            "",
            f"**{results['preset']} preset** ({m['preset']}: {m['description']}, {m['dtype']}; random weights), "
            f"{results['device'].upper()}: {label(results['machine'])}; llama.cpp `{results['llama_cpp_commit'][:8]}`, "
            f"peers {results['peer_version'] or 'llama-cpp-python not run'} and "
            f"{results.get('server_version') or 'llama-server not run'}; {results['timestamp'][:16].replace('T', ' ')} "
            f"UTC; medians; [results.json]({rel}/results.json)",
            "",
            settings_line(results),
            "",
            table(results),
            "",
            "Ratios are cost ratios (time, memory; for images/s the inverse): above 1x the first named costs more.",
            "",
            " ".join(f"![{name[:-4]}]({rel}/{name})" for name in results.get("plots", [])),
        ]
    parts.append(END)
    return "\n".join(parts)


def update_readme(readme: Path, results_dir: Path, root: Path) -> None:
    """Replace the block between the bench markers (or add it at the end) with the current results."""
    text = readme.read_text()
    block = readme_block(results_dir, root)
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(text)
