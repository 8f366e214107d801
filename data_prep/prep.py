"""``bertforge prep``: raw text -> SentencePiece tokenizer -> packed WebDataset shards + manifest.

The input is cut into *units* of about ``unit_size`` bytes: runs of whole files, in order, or
ranges of a large uncompressed file (cut where a document starts).
Each unit is tokenized (in ``workers`` processes), packed and written as its own shards,
then recorded in ``.prep/unit-NNNNN.json``; the manifest is the units' records joined in
order. (``dedup``: a pass before hashes every document, a unit at a time, saved as it goes:
:mod:`data_prep.dedup`.)
So the output is a function of the input and config alone (never of ``workers``), an
interrupted run resumes at the first unfinished unit, and a SLURM job array can give each
task its own units.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep import corpus, dedup, encode, manifest, tokenizer
from data_prep.config import PrepConfig, parse_size
from data_prep.errors import RunError, UserError, fault
from data_prep.files import LOCK, holder, holding, write_atomic
from data_prep.malloc import keep_freed_memory
from data_prep.manifest import STATE
from data_prep.shards import Packer, ShardWriter, token_dtype
from data_prep.workers import WORKER_DIED, bytes_bar, worker_pool
from launch.config import to_yaml


def plan_units(files: list[corpus.InputFile], unit_bytes: int) -> list[list[corpus.Part]]:
    """Cut the input, in order, into units of about ``unit_bytes``: small files are grouped,
    an uncompressed file over twice the size is cut into ranges at document starts."""
    parts: list[corpus.Part] = []
    for i, f in enumerate(files):
        if f.kind != "builtin" and f.compression is None and f.size > 2 * unit_bytes:
            parts.extend(corpus.split_points(i, f, unit_bytes))
        else:
            parts.append(corpus.Part(i))
    units: list[list[corpus.Part]] = [[]]
    size = 0
    for part in parts:
        if units[-1] and size >= unit_bytes:
            units.append([])
            size = 0
        units[-1].append(part)
        size += part.size(files[part.file])
    return units if units[0] else []


def _fingerprint(cfg: PrepConfig, files: list[corpus.InputFile]) -> dict:
    """What the output depends on; a resumed run must match it exactly."""
    inputs = []
    for f in files:
        mtime = 0 if f.kind == "builtin" else os.stat(f.path).st_mtime_ns
        inputs.append([f.path, f.size, mtime])
    tok = cfg.tokenizer.path
    return {
        "config": manifest.output_config(cfg),
        "inputs": inputs,
        "tokenizer_sha256": tokenizer.sha256(tok) if tok else None,
    }


def _foreign(out: Path) -> bool:
    """Whether folder ``out`` holds anything but a prep's own files."""
    return out.exists() and any(p.name not in (STATE, LOCK) and not p.name.endswith(".tmp") for p in out.iterdir())


AFTER_DEDUP = ("tokenizer", "seq_len", "shard_size", "block_size")
"""Config keys of the steps after the dedup pass: a folder that holds that pass alone (its tokenizer
step failed or was stopped: a vocabulary too large for the text) takes another value of these."""


def check_output(cfg: PrepConfig, files: list[corpus.InputFile]) -> None:
    """Refuse, writing nothing, an output folder that holds another prep (other config keys or input
    files) or files of no prep: ``bertforge submit prep``, before the queue (``cfg`` as its jobs get it)."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output exists and is not a folder")
    _check_output(out, _fingerprint(cfg, files), write=False)


def _check_output(out: Path, fingerprint: dict, write: bool = True) -> bool:
    """Prepare the output folder (``write``; else only check it); True when it already holds this
    exact, finished prep. A folder that holds the dedup pass alone is compared on what that pass
    depends on (:func:`_dedup_part`), and takes the rest of ``fingerprint``."""
    state = out / STATE / "state.json"
    started = (out / manifest.TOKENIZER).is_file() or any((out / STATE).glob("unit-*.json"))
    hashed = dedup.begun(out)
    if state.is_file() and (started or hashed):
        old = json.loads(state.read_text())
        # a key a prep from before it did not know: it ran as the key's default (dedup: none dropped)
        old["config"] = {**manifest.output_config(PrepConfig()), **old["config"]}
        _refuse_another(out, *((old, fingerprint) if started else map(_dedup_part, (old, fingerprint))))
        if write and old != fingerprint:  # (all in steps not run yet: the pass holds)
            write_atomic(state, json.dumps(fingerprint, indent=1))
        return (out / manifest.MANIFEST).is_file()
    if _foreign(out):
        raise UserError(f"{out}: output folder exists, is not empty and holds no bertforge prep")
    if write:
        (out / STATE).mkdir(parents=True, exist_ok=True)
        write_atomic(state, json.dumps(fingerprint, indent=1))
    return False


def _dedup_part(fingerprint: dict) -> dict:
    """What the dedup pass depends on of a prep's ``fingerprint``: all but the keys of the steps after
    it (:data:`AFTER_DEDUP`) and the ``--tokenizer`` file."""
    config = {k: v for k, v in fingerprint["config"].items() if k not in AFTER_DEDUP}
    return {**fingerprint, "config": config, "tokenizer_sha256": None}


def _refuse_another(out: Path, old: dict, new: dict) -> None:
    """Refuse, naming the first key that differs, a folder whose prep's fingerprint ``old`` is not ``new``."""
    for key in new:
        if old.get(key) != new[key]:
            detail = {
                "inputs": "set of input files (names, sizes or modification times)",
                "tokenizer_sha256": "--tokenizer file (config key 'tokenizer.path': its sha256)",
            }.get(key, key)
            if key == "config" and (diff := [k for k in new[key] if old[key].get(k) != new[key][k]]):
                detail = f"config key '{diff[0]}'"
            raise UserError(
                f"{out}: holds a prep made with a different {detail}; choose a new --output folder or delete this one"
            )


def _sample_texts(
    cfg: PrepConfig, files: list[corpus.InputFile], units: list[list[corpus.Part]], out: Path, scratch: corpus.Account
) -> Iterator[str]:
    """Texts for the tokenizer's sample: the first ``tokenizer.sample_bytes / units`` bytes of
    every unit, so that the pass is bounded in time as well as memory, and spread over the input
    (duplicates left out), counted on ``scratch`` (the real account is kept by the main pass)."""
    opts, max_line = dedup.parse_options(cfg, out), parse_size(cfg.max_line_bytes)
    per_unit = max(opts.read_size, parse_size(cfg.tokenizer.sample_bytes) // max(1, len(units)))
    for unit in units:
        taken = 0
        for part in unit:
            for chunk in corpus.chunks(part, files[part.file], scratch, opts, max_line):
                parsed = corpus.parse(chunk, opts)
                scratch.merge(parsed.account)
                yield from parsed.texts
                taken += chunk.nbytes
                if taken >= per_unit:
                    break
            if taken >= per_unit:
                break


def _tokenizer(
    cfg: PrepConfig, files: list[corpus.InputFile], units: list[list[corpus.Part]], out: Path, found: corpus.Account
) -> Path:
    """Reuse ``--tokenizer`` or the one a previous run trained, else train one on a sample (none in
    it: refused, saying why, with what became of the files ``found``)."""
    path = out / manifest.TOKENIZER
    if cfg.tokenizer.path:
        write_atomic(path, Path(cfg.tokenizer.path).read_bytes())
    elif not path.is_file():
        t0 = time.perf_counter()
        sampled = corpus.Account(strict=cfg.strict)
        lines = tokenizer.sample_lines(_sample_texts(cfg, files, units, out, sampled), cfg.tokenizer)
        if not lines:
            sampled.merge(found)
            raise UserError(
                f"tokenizer: no text to train on in the input's sample: {_why_no_text(cfg, sampled.to_dict())}"
            )
        print(
            f"prep: training a {cfg.tokenizer.type.value} tokenizer ({cfg.tokenizer.vocab_size} pieces) "
            f"on {len(lines):,} sampled lines",
            file=sys.stderr,
        )
        model = tokenizer.train(lines, cfg.tokenizer)
        write_atomic(path, model)
        print(f"prep: tokenizer trained in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return path


def run_unit(
    unit: int,
    parts: list[tuple[corpus.Part, corpus.InputFile]],
    cfg: PrepConfig,
    out: Path,
    vocab_size: int,
    pool: ProcessPoolExecutor | None,
    bar: tqdm | None = None,
) -> dict:
    """Tokenize, pack and write one unit; returns (and records) its shards and input account.

    With a ``pool``, the unit's chunks are tokenized by the pool's workers; without one, here
    (in the main process, or inside a worker that was given the whole unit).
    """
    dtype = token_dtype(vocab_size)
    block_seqs = max(1, parse_size(cfg.block_size) // (cfg.seq_len * dtype.itemsize))
    account = corpus.Account(strict=cfg.strict)
    shard_bytes = parse_size(cfg.shard_size)
    splits = {
        name: (Packer(cfg.seq_len, block_seqs, dtype), ShardWriter(out / name, f"shard-{unit:05d}", shard_bytes, out))
        for name in ("train", "val")
    }
    t0, tokens = time.perf_counter(), 0

    def consume(result: tuple[np.ndarray, np.ndarray, corpus.Account, int]) -> None:
        nonlocal tokens
        for (packer, writer), stream in zip(splits.values(), result[:2]):
            tokens += len(stream)
            for block in packer.add(stream):
                writer.write(block)
        account.merge(result[2])
        if bar is not None:
            bar.update(result[3])
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s", refresh=False)

    opts, max_line = dedup.parse_options(cfg, out), parse_size(cfg.max_line_bytes)
    chunks = (c for part, f in parts for c in corpus.chunks(part, f, account, opts, max_line))
    if pool is None:
        for chunk in chunks:
            consume(encode.encode_chunk(chunk))
    else:
        pending: deque = deque()
        limit = 2 * pool._max_workers + 2  # bounded in flight: memory stays flat whatever the corpus
        try:
            for chunk in chunks:
                pending.append(pool.submit(encode.encode_chunk, chunk))
                while len(pending) >= limit:
                    consume(pending.popleft().result())
        except UserError:  # the reader is ahead of the workers: an error earlier in the input wins
            while pending:
                consume(pending.popleft().result())
            raise
        while pending:
            consume(pending.popleft().result())
    if fault("kill-in-unit", unit):  # test hook: SIGKILL whoever writes unit N (the main process, or a
        os.kill(os.getpid(), signal.SIGKILL)  # worker) with its shards' temporary files half written
    record = {
        "unit": unit,
        "parts": [[f.path, p.start, p.end] for p, f in parts],
        "splits": {},
        "input": account.to_dict(),
    }
    for name, (packer, writer) in splits.items():
        for block in packer.finish():
            writer.write(block)
        record["splits"][name] = writer.close()
    write_atomic(out / STATE / f"unit-{unit:05d}.json", json.dumps(record, indent=1))
    return record


def _run_units_in_workers(
    todo: list[int],
    units: list[list[corpus.Part]],
    files: list[corpus.InputFile],
    cfg: PrepConfig,
    out: Path,
    vocab_size: int,
    pool: ProcessPoolExecutor,
    bar: tqdm,
    records: dict[int, dict],
) -> None:
    """Many units: each worker reads, tokenizes, packs and writes whole units, so the main process
    is idle and throughput scales with the workers. Results are taken in unit order, so the
    first error in the input is the one reported."""
    pending: deque = deque()
    queue = deque(todo)
    while queue or pending:
        while queue and len(pending) < 2 * pool._max_workers:
            u = queue.popleft()
            unit_parts = [(p, files[p.file]) for p in units[u]]
            pending.append((u, pool.submit(run_unit, u, unit_parts, cfg, out, vocab_size, None, None)))
        u, future = pending.popleft()
        records[u] = future.result()
        bar.update(records[u]["input"]["bytes_read"])


def _start_workers(workers: int, init_args: tuple) -> ProcessPoolExecutor:
    """The tokenizer worker processes, started now. On Linux by fork, while this process runs a
    single Python thread (before the progress bar's monitor thread, so no lock is copied mid-use;
    the native threads of OpenBLAS and of sentencepiece's trainer are idle then): a forked worker
    inherits numpy, sentencepiece and the parser already imported, where a spawned one imported
    them again (on 36 MB, prep's rate went from 0.46-0.49 to 0.59-0.63 of the raw encode x 2).
    Elsewhere, spawn. A worker that dies (out of memory, killed) fails the run with
    BrokenProcessPool, never a hang."""
    pool = worker_pool(workers, encode.init, init_args)
    try:
        pool.submit(int).result()  # with fork, the first task starts every worker at once
    except BrokenProcessPool:
        pool.shutdown(cancel_futures=True)
        raise RunError(WORKER_DIED) from None
    return pool


def _finished_units(out: Path, n_units: int) -> dict[int, dict]:
    """Units whose record exists and whose shards are all present at their recorded size."""
    done = {}
    for unit in range(n_units):
        path = out / STATE / f"unit-{unit:05d}.json"
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        shards = [s for split in record["splits"].values() for s in split]
        if all((out / s["path"]).is_file() and (out / s["path"]).stat().st_size == s["bytes"] for s in shards):
            done[unit] = record
    return done


def unfinished(out: Path) -> bool:
    """Whether ``out`` holds a prep not finished: its state, and no manifest yet (:func:`status`)."""
    return (out / STATE / "state.json").is_file() and not (out / manifest.MANIFEST).is_file()


def status(out: Path, brief: bool = False) -> str:
    """``bertforge inspect DIR`` of a prep not finished (:func:`unfinished`): whether a process holds
    the folder, its input, and how far each step went: the dedup pass's units hashed, or its
    lists; the tokenizer; the units written; the newest file written. ``brief`` (``bertforge
    jobs``, under a prep job): one line, of the dedup pass, the units and the newest file."""
    from launch.config import load_config

    fingerprint = json.loads((out / STATE / "state.json").read_text())
    cfg = load_config(PrepConfig, values={**fingerprint["config"], "output": str(out)})
    try:
        files = corpus.discover(cfg.input, corpus.Account(strict=cfg.strict))
        n = len(plan_units(files, parse_size(cfg.unit_size)))
    except UserError as err:  # (moved, deleted: the units are counted from the folder alone)
        said_input = f"input: cannot be read now: {err}"
        seen = (re.fullmatch(r"(?:unit|dedup)-(\d{5})\.(?:json|npy)", p.name) for p in (out / STATE).iterdir())
        n = 1 + max((int(m.group(1)) for m in seen if m), default=-1)
        of = ""  # (the total is not known)
    else:
        said_input = (
            f"input: {', '.join(cfg.input)}: {len(files)} file(s), {sum(f.size for f in files) / 1e6:,.1f} MB, "
            f"{n} unit(s) of about {cfg.unit_size}"
            + ("" if _fingerprint(cfg, files)["inputs"] == fingerprint["inputs"] else (
                "; changed since the prep started (other files, sizes or times): the same command is refused"))
        )  # fmt: skip
        of = f" of {n}"
    hashing = dedup.status(cfg, out, n, of)
    done = _finished_units(out, n)
    sequences = sum(s["sequences"] for r in done.values() for s in r["splits"]["train"])
    units = f"units written: {len(done)}{of} ({sequences:,} train sequences)"
    last = None  # (array tasks hold the folder shared, naming none of them: the newest file shows they write)
    if newest := _last_written(out):
        last = f"last written: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(newest[0]))}, {newest[1]}"
    if brief:
        return "; ".join(line for line in (hashing, units, last) if line)
    held, tok = holder(out), out / manifest.TOKENIZER
    lines = [
        f"{out}: a bertforge prep, not finished; " + (f"in use (by {held})" if held else "not running"),
        said_input,
        hashing,
        f"tokenizer: {tok if tok.is_file() else 'not yet ' + ('copied' if cfg.tokenizer.path else 'trained')}",
        units,
        last,
        f"the same bertforge prep command resumes it (its config keys: {out / STATE / 'state.json'})",
    ]
    return "\n".join(line for line in lines if line)


def _last_written(out: Path) -> tuple[float, str] | None:
    """The time and name (in ``out``) of the newest file of a prep's folders, hidden ones too."""
    found = []
    for folder in (out / STATE, out / "train", out / "val"):
        for path in folder.iterdir() if folder.is_dir() else ():
            with contextlib.suppress(FileNotFoundError):  # (a .tmp renamed meanwhile)
                found.append((path.stat().st_mtime, path.relative_to(out).as_posix()))
    return max(found, default=None)


def _remove_partial(out: Path) -> None:
    """Delete half-written shards and files left by an interrupted run (all hidden ``.tmp``)."""
    for folder in (out, out / "train", out / "val", out / STATE):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink()


def prep(cfg: PrepConfig, progress: bool = True, task: tuple[int, int] | None = None, hashing: bool = False) -> dict:
    """Run the prep stage; returns the manifest. Safe to re-run: finished units are kept.

    ``task=(i, n)`` runs one slice of a job array (``bertforge submit prep``): only the units
    ``u`` with ``u % n == i``, and no manifest (a final plain run writes it from the units'
    records, as a resumed run does). ``task=(0, 0)`` only plans the units and trains the
    tokenizer (``dedup``: after the dedup pass), the step before the array. With ``hashing``,
    ``task=(i, n)`` only hashes those units for the dedup pass (an array before the tokenizer
    step). Returns ``{"units": [...]}`` for those.
    """
    if hashing and not (cfg.dedup and task and task[1]):
        raise ValueError("hashing is a task (i, n) of a prep with dedup")
    cfg.validate()
    t0 = time.perf_counter()
    discovered = corpus.Account(strict=cfg.strict)
    files = corpus.discover(cfg.input, discovered)
    if not files:
        raise UserError(f"input {cfg.input}: no .txt or .jsonl files found")
    if cfg.tokenizer.path:
        tokenizer.load(cfg.tokenizer.path)  # refuse a bad model before anything is written
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output exists and is not a folder")
    if not (out / STATE / "state.json").is_file() and _foreign(out):  # (refused before a lock file is made)
        raise UserError(f"{out}: output folder exists, is not empty and holds no bertforge prep")
    check_against(cfg)
    fingerprint = _fingerprint(cfg, files)
    # one prep at a time writes the folder (two had written the same shards' .tmp files, and a second
    # start removed the first's files in flight), or the tasks of one job array together; its
    # fingerprint too (a second start with other settings had replaced the first's before being refused)
    with holding(out, shared=task is not None, other="choose another --output"):
        if _check_output(out, fingerprint):
            print(f"prep: {out} is already complete; nothing to do", file=sys.stderr)
            man = manifest.load(out)
            print(manifest.summary(man))
            return man
        if hashing:
            return dedup.hash_task(cfg, out, files, plan_units(files, parse_size(cfg.unit_size)), task, progress)
        return _write(cfg, out, files, discovered, task, progress, t0)


def _why_no_text(cfg: PrepConfig, account: dict) -> str:
    """What became of the documents and files of an input ``account`` that holds no document kept, in
    a few words for a one-line refusal (a .jsonl's text under another key: where to name it)."""
    docs, files = account["documents"], account["files"]
    why = [f"{reason} {r['count']:,}, first at {r['examples'][0]}" for reason, r in docs["skipped"].items()]
    of_files = [f"{reason} {r['count']:,}, first {r['examples'][0]}" for kind in ("skipped", "ignored")
                for reason, r in files[kind].items()]  # fmt: skip
    said = f"{docs['read']:,} documents read, all skipped ({'; '.join(why)})"
    if not docs["read"]:
        said = f"no document read ({'; '.join(of_files) or 'its files hold none'})"
    elif of_files:
        said += f"; files skipped or ignored: {'; '.join(of_files)}"
    if "missing_field" in docs["skipped"]:
        said += f"; a .jsonl line's text is read from field '{cfg.text_field}' (--text-field KEY names another)"
    return said


def check_against(cfg: PrepConfig) -> None:
    """Refuse, before any work, a ``dedup_against`` folder that is no dedup prep, one whose hashes
    cannot be read (with ``near_dup``: whose bands are missing, of another threshold or unreadable),
    or the output folder itself (``bertforge submit prep`` too, before the queue)."""
    for other in cfg.dedup_against:
        manifest.theirs(other, cfg.near_dup)
        if Path(other).resolve() == Path(cfg.output).resolve():
            raise UserError(f"config key 'dedup_against': {other} is the output folder itself")


def _write(
    cfg: PrepConfig,
    out: Path,
    files: list[corpus.InputFile],
    discovered: corpus.Account,
    task: tuple[int, int] | None,
    progress: bool,
    t0: float,
) -> dict:
    """What :func:`prep` does once it holds the output folder."""
    if task is None:
        _remove_partial(out)  # (not in an array task: the other tasks' files in flight are .tmp too)
    units = plan_units(files, parse_size(cfg.unit_size))
    workers = cfg.workers or os.cpu_count() or 1
    if cfg.dedup and not (task is not None and task[1]):  # (an array task reads the tokenizer step's)
        dedup.find_duplicates(cfg, files, units, out, workers, progress)
    if task is not None and task[1]:  # an array task reads the tokenizer step's file and never writes it
        tok_path = out / manifest.TOKENIZER
        if not tok_path.is_file():
            raise RunError(f"{out}: no {manifest.TOKENIZER}: the tokenizer step (task 0/0) must run before the array")
    else:
        tok_path = _tokenizer(cfg, files, units, out, discovered)
    if task == (0, 0):
        return {"units": list(range(len(units)))}
    vocab_size = tokenizer.load(tok_path).vocab_size()  # also checks the special ids
    records = _finished_units(out, len(units))
    if records:
        print(f"prep: resuming: {len(records)} of {len(units)} units already done", file=sys.stderr)
    todo = [u for u in range(len(units)) if u not in records and (task is None or u % task[1] == task[0])]
    if task is not None:
        print(f"prep: array task {task[0]} of {task[1]}: {len(todo)} unit(s) to write", file=sys.stderr)
    # the main pass (not the dedup pass before it, whose blocks go back to the system as they are
    # joined): this process and the workers it forks keep the memory they free, so that each chunk's
    # arrays reuse the last one's pages instead of mapping and page-faulting fresh ones
    keep_freed_memory()
    pool = None
    init_args = (tok_path.read_bytes(), token_dtype(vocab_size).str, dedup.parse_options(cfg, out))
    if workers > 1 and todo:
        pool = _start_workers(workers, init_args)  # before the progress bar's thread exists
    else:
        encode.init(*init_args)
    bar = None
    try:  # (from here on, whatever fails, the workers are shut down)
        bar = bytes_bar("prep", [p for u in todo for p in units[u]], files, progress)
        if pool is not None and len(todo) >= 2 * workers:
            print(f"prep: {len(todo)} units over {workers} workers, whole units each", file=sys.stderr)
            _run_units_in_workers(todo, units, files, cfg, out, vocab_size, pool, bar, records)
        else:
            if pool is not None:
                print(f"prep: {len(todo)} unit(s), chunks over {workers} workers", file=sys.stderr)
            for u in todo:
                records[u] = run_unit(u, [(p, files[p.file]) for p in units[u]], cfg, out, vocab_size, pool, bar)
    except BrokenProcessPool:
        raise RunError(WORKER_DIED) from None
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.shutdown(wait=sys.exc_info()[0] is None, cancel_futures=True)
    if task is not None:
        return {"units": todo}
    man = manifest.build(cfg, files, discovered, [records[u] for u in range(len(units))], tok_path, vocab_size)
    if not man["input"]["documents"]["written"]:  # (no manifest: a dataset of nothing is no dataset)
        lead = "no document written: " if man["input"]["documents"]["read"] else ""  # (else: "no document read")
        raise UserError(f"input {' '.join(cfg.input)}: {lead}{_why_no_text(cfg, man['input'])}")
    write_atomic(out / manifest.MANIFEST, json.dumps(man, indent=1, sort_keys=False) + "\n")
    write_atomic(out / "prep_config.yaml", to_yaml(cfg))
    print(manifest.summary(man, seconds=time.perf_counter() - t0))
    return man
