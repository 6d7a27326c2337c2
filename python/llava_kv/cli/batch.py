"""``llava-kv batch``: one prompt over many images, one JSON line per image, resumable.

PATHs expand to image files (:func:`expand_paths`); results are appended to the --out file as they
arrive, so a rerun skips what is already there and resumes an interrupted run.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from .options import (add_command, UsageError, add_conversation_args, add_model_args, add_sampling_args, err,
                      load_model, model_paths, positive_int, sampling)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def add_parser(sub: Any) -> None:
    p = add_command(
        sub, "batch", help="one prompt over many images -> JSON lines, resumable",
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
        examples=[
            "llava-kv batch --model m.gguf --mmproj p.gguf --prompt 'Caption this image.' \\",
            "    --max-tokens 64 --out captions.jsonl photos/ 'scans/**/*.png' extra.jpg",
            "# rerun after an interruption: done images are skipped; retry the failed ones:",
            "llava-kv batch ... --out captions.jsonl --retry-errors photos/",
        ])
    add_model_args(p, test_pair=False, required=True)
    g = p.add_argument_group("input and output")
    g.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or globs")
    g.add_argument("--prompt", required=True, help="the prompt asked about every image")
    g.add_argument("--out", metavar="FILE",
                   help="JSON-lines file to append results to (created if missing; its images are skipped); "
                   "'-' or no --out writes to stdout")
    g.add_argument("--retry-errors", action="store_true",
                   help="run again the images whose line in --out has an error (their old lines are replaced)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    g = p.add_argument_group("run")
    g.add_argument("--parallel", type=positive_int, default=4, metavar="N",
                   help="images generated at the same time (default: %(default)s)")
    add_conversation_args(g, image_help=None, n_ctx=None,
                          n_ctx_help="context size per image (default: what the prompt, image and --max-tokens need)")
    add_sampling_args(p, max_tokens=64)
    g = p.add_argument_group("structured output")
    held = g.add_mutually_exclusive_group()
    held.add_argument("--json-schema", metavar="FILE",
                      help="hold every answer to this JSON Schema (a .json file); each line gets a 'json' field "
                      "with the parsed answer, and an answer that ran out of --max-tokens before its JSON closed "
                      "is an error line")
    held.add_argument("--grammar", metavar="FILE", help="hold every answer to this GBNF grammar (start rule 'root')")
    p.set_defaults(func=batch)


def _constraint_args(args: argparse.Namespace) -> dict[str, Any]:
    """--json-schema / --grammar read from their files (a UsageError naming the file if unreadable)."""
    for flag, key in (("json_schema", "json_schema"), ("grammar", "grammar")):
        path = getattr(args, flag, None)
        if path is None:
            continue
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--{flag.replace('_', '-')} {path}: {e}") from None
        from llava_kv.structured import constraint

        try:
            value: Any = json.loads(text) if key == "json_schema" else text
            constraint(**{key: value})  # a schema the converter refuses is a usage error, before the model loads
        except ValueError as e:
            raise UsageError(f"--{flag.replace('_', '-')} {path}: {e}") from None
        return {key: value}
    return {}


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
            err(f"note: ignoring the cut-off last line of {path} (its image is run again)")
    return entries, needs_rewrite


def _parse_record(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("image"), str) else None


def _plan(paths: Sequence[str], entries: list[tuple[bytes, dict[str, Any] | None]], *,
          retry_errors: bool) -> tuple[list[str], set[str], int]:
    """Which images to run: those without a record, and with ``retry_errors`` those whose record is
    an error. Returns ``(todo, retry, skipped)``: ``retry`` holds the path keys of the error records
    to replace."""
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
        elif record.get("error") and retry_errors:
            todo.append(path)
            retry.add(_path_key(path))
        else:
            skipped += 1
    return todo, retry, skipped


def _rewrite_without(out_path: Path, entries: list[tuple[bytes, dict[str, Any] | None]], retry: set[str]) -> None:
    """Drops the error records about to be retried (so each image keeps one line) and a cut-off last
    line; written aside and renamed, so an interruption loses nothing."""
    keep = [raw for raw, record in entries
            if not (record is not None and record.get("error") and _path_key(record["image"]) in retry)]
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_bytes(b"".join(raw + b"\n" for raw in keep))
    os.replace(tmp, out_path)


def batch(args: argparse.Namespace) -> int:
    paths, unmatched, missing = expand_paths(args.paths)
    for pattern in unmatched:
        err(f"warning: no image matches {pattern!r}")
    if len(missing) == len(paths):
        raise UsageError("no PATH matched an image file: " + " ".join(map(repr, args.paths)))
    for pattern in missing:
        err(f"warning: {pattern}: no such file (it gets an error record)")
    pair = model_paths(args)
    held = _constraint_args(args)

    to_stdout = args.out in (None, "-")
    out_path = None if to_stdout else Path(args.out)
    entries: list[tuple[bytes, dict[str, Any] | None]] = []
    needs_rewrite = False
    if out_path is not None:
        if out_path.is_dir():
            raise UsageError(f"--out {args.out} is a folder; give a .jsonl file")
        entries, needs_rewrite = _read_results(out_path)
    todo, retry, skipped = _plan(paths, entries, retry_errors=args.retry_errors)

    ok = failed = 0
    failures: list[tuple[str, str]] = []
    interrupted = False
    if todo:
        from llava_kv import batch as lk_batch

        if out_path is not None and (needs_rewrite or retry):
            _rewrite_without(out_path, entries, retry)
        if out_path is not None and out_path.parent != Path(""):
            out_path.parent.mkdir(parents=True, exist_ok=True)
        sink = sys.stdout if out_path is None else open(out_path, "a", encoding="utf-8")
        try:
            with load_model(args, pair) as model:
                records = lk_batch.iter_run(
                    model, todo, args.prompt, ordered=True, parallel=args.parallel, progress=not args.no_progress,
                    system=args.system, chat_template=args.chat_template, n_ctx=args.n_ctx, n_threads=args.threads,
                    **sampling(args), **held)
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
        err(f"failed: {image}: {error}")
    if len(failures) > 10:
        err(f"... and {len(failures) - 10} more failures (see the error fields)")
    where = "" if out_path is None else f" -> {out_path}"
    left = f", {len(todo) - ok - failed} not run (interrupted; run again to resume)" if interrupted else ""
    err(f"{ok} ok, {failed} failed, {skipped} skipped{left}{where}")
    return 130 if interrupted else 0


