"""``bertforge prep`` end to end: real SentencePiece, real tar shards read back through webdataset."""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from data_prep.shards import read_blocks
from data_prep.tokenizer import CLS_ID, PAD_ID
from tests.conftest import REPO, heavy_imports, refusal, run_cli, run_prep, split_at_sep

prep = run_prep  # the command under test, as a user types it


def shard_docs(out: Path, split: str = "train") -> list[list[int]]:
    """The documents' token ids, in order, as the shards hold them (via webdataset)."""
    man = json.loads((out / "manifest.json").read_text())
    flat: list[int] = []
    for shard in man["splits"][split]["shards"]:
        for block in read_blocks(out / shard["path"]):
            assert block.shape[1] == man["seq_len"]
            assert (block[:, 0] == CLS_ID).all()
            flat.extend(int(t) for t in block[:, 1:].reshape(-1) if t != PAD_ID)
    return split_at_sep(flat)


def write(folder: Path, content: dict[str, list[str]]) -> Path:
    """A folder of input files, each of its documents (``.txt``: blank-line separated; ``.jsonl``)."""
    folder.mkdir()
    for name, texts in content.items():
        lines = [json.dumps({"text": d}) for d in texts] if name.endswith(".jsonl") else texts
        (folder / name).write_text(("\n" if name.endswith(".jsonl") else "\n\n").join(lines) + "\n")
    return folder


def tree(out: Path) -> dict[str, bytes]:
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "prep_config.yaml"
    }


def running(needle: str) -> list[str]:
    """The command lines of this machine's processes that hold ``needle``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            line = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # (ended meanwhile)
            continue
        if needle in line:
            found.append(line)
    return found


def test_round_trip_gives_the_documents_tokens_in_order(tmp_path, corpus, sp_model) -> None:
    root, docs = corpus
    out = tmp_path / "ds"
    r = prep(
        "--input",
        str(root),
        "--output",
        str(out),
        "--tokenizer",
        str(sp_model),
        "--seq-len",
        "64",
        "--workers",
        "2",
        "val_fraction=0",
    )
    assert r.returncode == 0, r.stderr
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert shard_docs(out) == [sp.encode(d) for d in docs]
    man = json.loads((out / "manifest.json").read_text())
    assert man["input"]["documents"] == {
        "read": len(docs),
        "written": len(docs),
        "skipped": {},
        "split": {"count": 0, "examples": []},
        "repaired_utf8": {"count": 0, "examples": []},
    }
    assert man["tokenizer"]["vocab_size"] == 1000 and man["dtype"] == "uint16"
    assert man["tokenizer"]["special_ids"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert (out / "tokenizer.model").read_bytes() == sp_model.read_bytes()
    assert "split" in r.stdout and "documents:" in r.stdout  # the summary table
    assert "workers: 2" in (out / "prep_config.yaml").read_text()


def test_val_split_partitions_the_documents(tmp_path, corpus, sp_model) -> None:
    root, docs = corpus
    out = tmp_path / "ds"
    r = prep("--input", str(root), "--output", str(out), "--tokenizer", str(sp_model), "val_fraction=0.2")
    assert r.returncode == 0, r.stderr
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    train, val = shard_docs(out, "train"), shard_docs(out, "val")
    assert 0.1 * len(docs) < len(val) < 0.3 * len(docs)
    assert sorted(map(tuple, train + val)) == sorted(tuple(sp.encode(d)) for d in docs)


@pytest.mark.parametrize("unit_size, mode", [("1KB", "whole units each"), ("1GB", "chunks over 2 workers")])
def test_same_bytes_whatever_the_worker_count(tmp_path, corpus, sp_model, unit_size, mode) -> None:
    root, _ = corpus
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        args = ["--input", str(root), "--output", str(out), "--tokenizer", str(sp_model), "--workers", workers]
        r = prep(*args, f"unit_size={unit_size}", "shard_size=30KB", "block_size=4KB")
        assert r.returncode == 0, r.stderr
        assert workers == "1" or mode in r.stderr  # both ways of sharing work with the workers ran
        outs.append(tree(out))
    assert outs[0] == outs[1]
    assert sum(k.startswith("train/") for k in outs[0]) > 6  # several shards were compared


def test_tokenizer_training_is_deterministic_and_manifest_is_complete(tmp_path, corpus) -> None:
    root, docs = corpus
    trees = []
    for workers, name in (("1", "a"), ("2", "b")):
        out = tmp_path / name
        r = prep(
            "--input",
            str(root),
            "--output",
            str(out),
            "--vocab-size",
            "800",
            "--workers",
            workers,
            "tokenizer.sample_lines=5000",
        )
        assert r.returncode == 0, r.stderr
        trees.append(tree(out))
    assert trees[0] == trees[1]
    man = json.loads(trees[0]["manifest.json"])
    assert man["tokenizer"]["vocab_size"] == 800 and man["config"]["tokenizer"]["type"] == "unigram"
    shards = man["splits"]["train"]["shards"] + man["splits"]["val"]["shards"]
    assert all(set(s) >= {"path", "sequences", "tokens", "bytes", "sha256"} for s in shards)
    import hashlib

    assert all(hashlib.sha256((tmp_path / "a" / s["path"]).read_bytes()).hexdigest() == s["sha256"] for s in shards)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "a" / "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert sp.encode("[MASK]") != [4]  # a control symbol: text never turns into the mask token
    assert man["input"]["documents"]["read"] == len(docs)


def test_bpe_tokenizer(tmp_path, corpus) -> None:
    root, docs = corpus
    out = tmp_path / "bpe"
    r = prep("--input", str(root / "a.txt"), "--output", str(out), "--vocab-size", "600", "--tokenizer-type", "bpe")
    assert r.returncode == 0, r.stderr
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString((out / "tokenizer.model").read_bytes())
    assert proto.trainer_spec.model_type == pb.TrainerSpec.BPE and proto.trainer_spec.byte_fallback
    assert sp.encode("\u2603 snow")[1:4] != [1, 1, 1]  # byte fallback spells unseen characters, no [UNK]


def test_bytes_on_disk_are_close_to_two_per_token(tmp_path, corpus, sp_model) -> None:
    root, _ = corpus
    out = tmp_path / "ds"
    assert (
        prep("--input", str(root), "--output", str(out), "--tokenizer", str(sp_model), "val_fraction=0").returncode == 0
    )
    man = json.loads((out / "manifest.json").read_text())
    train = man["splits"]["train"]
    stored = train["tokens"] + train["pad_tokens"]
    assert abs(train["bytes"] / stored - 2.0) < 0.05 * 2.0, train


def test_interrupted_prep_resumes_to_the_same_bytes(tmp_path, docs, sp_model) -> None:
    root = tmp_path / "in"
    root.mkdir()
    for i in range(10):  # ten files of ~28 KB: about one unit each
        (root / f"part{i}.txt").write_text("\n\n".join(docs[i::10]))
    common = [
        "--input",
        str(root),
        "--tokenizer",
        str(sp_model),
        "--workers",
        "1",
        "--dedup",  # (its pass's records, .prep/duplicates.npy and near_duplicates.npy, are kept for the resume too)
        "--near-dup",
        "0.5",
        "unit_size=16KB",
        "shard_size=8KB",
        "block_size=2KB",
    ]
    full = tmp_path / "full"
    assert prep(*common, "--output", str(full)).returncode == 0
    skipped = json.loads((full / "manifest.json").read_text())["input"]["documents"]["skipped"]
    assert skipped["duplicate"]["count"] and skipped["near_duplicate"]["count"], skipped
    n_units = json.loads((full / "manifest.json").read_text())["units"]
    assert n_units >= 8

    out = tmp_path / "cut"  # kill -9 while it hashes unit 4 in the dedup pass: the units before are kept
    r = prep(*common, "--output", str(out), env={**os.environ, "BERTFORGE_FAULT": "kill-in-hash@4"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert sorted(p.name for p in out.glob(".prep/dedup-*.npy")) == [f"dedup-0000{u}.npy" for u in range(4)]
    # bertforge inspect says how far each step went, and how to go on
    said = run_cli("inspect", str(out)).stdout.splitlines()
    assert said[0] == f"{out}: a bertforge prep, not finished; not running", said
    assert said[1].startswith(f"input: {root}: 10 file(s), ") and said[1].endswith(f", {n_units} unit(s) of about 16KB")
    size = sum(p.stat().st_size for p in out.glob(".prep/*-0000[0-3].npy")) / 1e6  # (records and band keys)
    assert said[2:5] == [f"dedup pass: 4 of {n_units} units hashed ({size:,.1f} MB in .prep/ until the pass ends)",
                         "tokenizer: not yet copied",
                         f"units written: 0 of {n_units} (0 train sequences)"], said  # fmt: skip
    # then kill -9 while it writes unit 3 (the fault hook: a kill timed from outside could miss the window
    r = prep(*common, "--output", str(out), env={**os.environ, "BERTFORGE_FAULT": "kill-in-unit@3"})  # on a
    assert r.returncode == -signal.SIGKILL, r.stderr  # loaded machine)
    assert f"prep: dedup: resuming: 4 of {n_units} units already hashed" in r.stderr, r.stderr
    assert (out / ".prep/unit-00002.json").exists() and not (out / ".prep/unit-00003.json").exists()
    r = run_cli("pretrain", str(REPO / "configs/pretrain/tiny.yaml"), f"data.path={out}", f"run.dir={tmp_path / 'run'}")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (  # (a run on it: what to do, in one line)
        f"bertforge: error: {out / 'manifest.json'}: no manifest yet: {out} holds a bertforge prep not finished "
        f"(bertforge inspect {out} says how far it went; the same bertforge prep command resumes it)"), r.stderr  # fmt: skip
    r = run_cli("inspect", str(out))
    written = sum(
        s["sequences"]
        for u in range(3)
        for s in json.loads((full / f".prep/unit-0000{u}.json").read_text())["splits"]["train"]
    )
    assert r.stdout.splitlines()[2:] == [
        f"dedup pass: done; {skipped['duplicate']['count']:,} copies and {skipped['near_duplicate']['count']:,} near copies to drop",
        f"tokenizer: {out / 'tokenizer.model'}",
        f"units written: 3 of {n_units} ({written:,} train sequences)",
        *[line for line in r.stdout.splitlines() if line.startswith("last written: ")],
        f"the same bertforge prep command resumes it (its config keys: {out / '.prep/state.json'})",
    ], r.stdout  # fmt: skip
    from launch.submit import progress  # (bertforge jobs, under a prep job: the same, in one line; none once done)

    job = {"stage": "prep:shards", "log_dir": str(tmp_path)}
    lines = r.stdout.splitlines()
    assert progress({**job, "run_dir": str(out)}) == f"{lines[2]}; {lines[4]}; {lines[5]} ({out})", r.stdout
    assert progress({**job, "run_dir": str(full)}) is None
    newest = max(p.stat().st_mtime for d in ("train", "val", ".prep") for p in (out / d).iterdir())
    when, name = r.stdout.splitlines()[5].removeprefix("last written: ").split(", ")  # (of the unit cut short)
    assert (out / name).stat().st_mtime == newest and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", when), r.stdout
    first = root / "part0.txt"  # an input file touched since: said (the same command is refused); the input moved:
    times = first.stat().st_atime_ns, first.stat().st_mtime_ns  # the units counted from the folder alone
    first.touch()
    said = run_cli("inspect", str(out)).stdout.splitlines()
    assert said[1].endswith(
        "; changed since the prep started (other files, sizes or times): the same command is refused"
    ), said
    os.utime(first, ns=times)
    root.rename(tmp_path / "away")
    said = run_cli("inspect", str(out)).stdout.splitlines()
    assert said[1] == f"input: cannot be read now: {root}: no such file or folder", said
    assert said[4] == f"units written: 3 ({written:,} train sequences)", said
    (tmp_path / "away").rename(root)
    assert list(out.glob("train/.shard-00003-*.tar.tmp")) and not (out / "manifest.json").exists()
    # Nothing half-written is visible: every shard under its final name is a complete tar.
    for shard in list(out.glob("train/*.tar")) + list(out.glob("val/*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                np.load(io.BytesIO(tar.extractfile(member).read()))
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("train/shard-0000[0-2]-*.tar")}
    assert kept

    # while another prep writes the folder, a second is refused (it had removed the first's files in flight,
    # and both wrote the same shards' .tmp files); the tasks of one job array share it, never with a plain run
    from data_prep.files import holding

    with holding(out):
        r = prep(*common, "--output", str(out))
    (said,) = r.stderr.strip().splitlines()
    assert (
        r.returncode == 2
        and said.startswith(
            f"bertforge: error: {out}: another run is using this folder (pid {os.getpid()} on {socket.gethostname()}, since "
        )
        and said.endswith("); wait for it to end, or choose another --output")
    ), r.stderr
    with holding(out, shared=True), holding(out, shared=True):
        assert "another run is using this folder (a bertforge process)" in refusal(holding(out).__enter__)
        said = run_cli("inspect", str(out)).stdout  # (bertforge inspect tells an array's tasks, which name no one)
        assert said.startswith(f"{out}: a bertforge prep, not finished; in use (by a prep job array's tasks, which "
                               "share it)\n"), said  # fmt: skip
    # a start while another process holds the folder for an instant (bertforge inspect's test of the lock,
    # here a process that holds it 0.3 s) waits for it, rather than being refused
    hold = "import sys, time; from data_prep.files import holding\nwith holding(sys.argv[1]):\n print(flush=True); time.sleep(0.3)"
    with subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, cwd=REPO) as brief:
        assert brief.stdout.readline() == b"\n"  # (it holds the folder now)
        with holding(out):  # (refused at once, as before the wait)
            pass
    assert brief.returncode == 0
    fresh = tmp_path / "fresh"  # a prep just begun (training its tokenizer, no unit done): its fingerprint is
    with holding(fresh):  # kept (a second start with other settings had replaced it before being refused)
        (fresh / ".prep").mkdir()
        (fresh / ".prep/state.json").write_text('{"first": "prep"}')
        r = prep(*common, "--output", str(fresh), "--seq-len", "32")
    assert r.returncode == 2 and "another run is using this folder" in r.stderr, r.stderr
    assert (fresh / ".prep/state.json").read_text() == '{"first": "prep"}'

    # a rerun whose write fails (a full disk; here a file-size limit, which the tokenizer's copy meets first):
    # one line naming the file, not the traceback (a write's OSError names no file); the next rerun finishes
    import resource

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    r = prep(*common, "--output", str(out), preexec_fn=small_files)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert re.fullmatch(
        rf"bertforge: error: {re.escape(str(out))}/\.tokenizer\.model\.\d+\.tmp: File too large",
        r.stderr.splitlines()[-1],
    )
    r = prep(*common, "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert "resuming: " in r.stderr and f"of {n_units} units already done" in r.stderr and "dedup" not in r.stderr
    assert {p: (out / "train" / p).stat().st_mtime_ns for p in kept} == kept  # finished units not redone
    assert tree(out) == tree(full)
    assert not list(out.rglob(".*.tmp"))

    state = json.loads((out / ".prep/state.json").read_text())  # as a prep from before min_chars wrote it:
    del state["config"]["min_chars"]  # the key's default is what it ran with
    (out / ".prep/state.json").write_text(json.dumps(state))
    again = prep(*common, "--output", str(out))
    assert again.returncode == 0 and "already complete" in again.stderr, again.stderr
    again = prep(*common, "--output", str(out), "min_chars=3")
    assert again.returncode == 2 and "holds a prep made with a different config key 'min_chars'" in again.stderr


def test_a_killed_worker_fails_the_run_with_one_line_and_a_rerun_finishes_it(tmp_path, docs, sp_model) -> None:
    root = tmp_path / "in"
    root.mkdir()
    for i in range(40):  # forty files of ~7 KB, a unit each: work queued for both workers
        (root / f"part{i:02}.txt").write_text("\n\n".join(docs[i::40]))
    common = ["--input", str(root), "--tokenizer", str(sp_model), "--workers", "2", "unit_size=4KB",
              "shard_size=8KB", "block_size=2KB"]  # fmt: skip
    out = tmp_path / "ds"  # the worker writing unit 5 is killed there (as by the out-of-memory killer): the
    r = prep(*common, "--output", str(out), env={**os.environ, "BERTFORGE_FAULT": "kill-in-unit@5"}, timeout=120)
    assert r.returncode == 1 and "units over 2 workers, whole units each" in r.stderr, r.stderr  # run fails
    assert r.stderr.strip().splitlines()[-1].startswith("bertforge: error: prep: a worker process died"), r.stderr
    assert not (out / ".prep/unit-00005.json").exists()  # no hang
    assert not (out / "manifest.json").exists()
    r = prep(*common, "--output", str(out))
    assert r.returncode == 0 and "resuming: " in r.stderr, r.stderr
    full = tmp_path / "full"
    assert prep(*common, "--output", str(full)).returncode == 0
    assert tree(out) == tree(full)
    # the same in the dedup pass: the worker hashing unit 20 is killed; the rerun hashes only the units not
    # hashed yet (each saved once hashed, .prep/dedup-NNNNN.npy and its band keys bands-NNNNN.npy), one
    # whose band keys are gone and one saved by the bertforge before (its band keys in its records), each
    # said in a line, then the worker finding band 3's candidate pairs of near copies is killed; the next
    # rerun clusters, writes what an unbroken run writes, tidies up
    near, cut = [*common, "--dedup", "--near-dup", "0.8"], tmp_path / "near"
    for kill in ("kill-in-hash@20", "kill-in-band@3"):
        hashed = {p.name: p.stat().st_mtime_ns for p in cut.glob(".prep/dedup-*.npy")}
        if hashed:
            lost = cut / ".prep" / min(hashed).replace("dedup-", "bands-")
            lost.unlink()
            older = cut / ".prep" / max(hashed)  # (a unit saved by the bertforge before: its band keys in its records)
            records, keys = np.load(older), np.load(lost.with_name(older.name.replace("dedup-", "bands-")))
            fields = [*records.dtype.descr[:3], ("bands", "<u8", (len(keys),)), records.dtype.descr[3]]
            old = np.empty(len(records), fields)
            for name in records.dtype.names:
                old[name] = records[name]
            old["bands"] = keys.T
            np.save(older, old)
        r = prep(*near, "--output", str(cut), env={**os.environ, "BERTFORGE_FAULT": kill}, timeout=120)
        assert r.returncode == 1, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("bertforge: error: prep: a worker process died"), r.stderr
    n = json.loads((full / "manifest.json").read_text())["units"]
    assert 10 <= len(hashed) < n and "dedup-00020.npy" not in hashed, sorted(hashed)
    assert sorted(p.name for p in cut.glob(".prep/bands-*.npy")) == [f"bands-{u:05}.npy" for u in range(n)]
    assert f"prep: dedup: {cut}/.prep/{min(hashed)}: cannot read it (its band keys: {lost.name}: [Errno 2] No such " \
           f"file or directory: '{lost}'); hashing its unit again" in r.stderr, r.stderr  # fmt: skip
    assert f"prep: dedup: {older}: cannot read it (records of fields files, keys, hashes, bands, marks of shape " \
           f"({len(old)},), not files, keys, hashes, marks); hashing its unit again" in r.stderr, r.stderr  # fmt: skip
    assert f"prep: dedup: resuming: {len(hashed) - 2} of {n} units already hashed" in r.stderr, r.stderr
    again = {p.name: p.stat().st_mtime_ns for p in cut.glob(".prep/dedup-*.npy") if p.name in hashed}
    for name in (min(hashed), max(hashed)):  # (those two hashed again)
        assert again.pop(name) != hashed.pop(name)
    assert again == hashed
    assert len(list(cut.glob(".prep/dedup-*.npy"))) == n
    r = prep(*near, "--output", str(cut))
    assert r.returncode == 0 and f"resuming: {n} of {n} units already hashed" in r.stderr, r.stderr
    assert not list(cut.glob(".prep/dedup-*.npy")) and not list(cut.glob(".prep/bands-*.npy"))
    # fewer units than two a worker (their chunks shared out): the same, this process killed before it saves unit 2
    few = [*near[:-3], "unit_size=100KB", *near[-3:]]
    r = prep(*few, "--output", str(tmp_path / "few"), env={**os.environ, "BERTFORGE_FAULT": "kill-in-hash@2"})
    assert r.returncode == -signal.SIGKILL, r.stderr  # (its workers died with it: they had waited for work
    assert not running(str(tmp_path / "few")), running(str(tmp_path / "few"))  # forever, holding the pipes)
    assert sorted(p.name for p in tmp_path.glob("few/.prep/dedup-*.npy")) == ["dedup-00000.npy", "dedup-00001.npy"]
    saved = tmp_path / "few/.prep/dedup-00000.npy"  # damaged (a disk's fault: it is written whole, then
    whole = saved.read_bytes()  # renamed): said in one line, and its unit hashed again (with unit 2, not 1)
    saved.write_bytes(whole[: len(whole) // 2])
    older = saved.with_suffix(".npz")  # (a unit an older bertforge saved: hashed again, then removed with the rest)
    older.write_bytes(b"PK")
    r = prep(*few, "--output", str(tmp_path / "few"))
    assert r.returncode == 0 and "prep: dedup: resuming: 1 of 3 units already hashed" in r.stderr, r.stderr
    assert (
        f"prep: dedup: {saved}: cannot read it (mmap length is greater than file size); hashing its unit again\n"
    ) in r.stderr, r.stderr
    assert not list(tmp_path.glob("few/.prep/dedup-*"))
    assert prep(*few, "--output", str(tmp_path / "few-full")).returncode == 0
    assert tree(tmp_path / "few") == tree(tmp_path / "few-full")
    assert prep(*near, "--output", str(tmp_path / "near-full")).returncode == 0
    assert tree(tmp_path / "near") == tree(tmp_path / "near-full")


def test_the_dedup_pass_maps_more_unit_files_than_the_soft_limit_of_open_files(tmp_path, docs, sp_model) -> None:
    """The dedup pass maps every unit's file at once (each holds a file open): prep raises its soft
    limit of open files (``ulimit -n``) as far as the hard one allows, and past that says so in one
    line before any work."""
    root = tmp_path / "in"
    root.mkdir()
    for i in range(40):
        (root / f"part{i:02}.txt").write_text("\n\n".join(docs[i::40]))
    common = ["--input", str(root), "--tokenizer", str(sp_model), "--workers", "1", "--dedup", "--near-dup", "0.8",
              "unit_size=1KB", "shard_size=8KB", "block_size=2KB"]  # fmt: skip
    assert prep(*common, "--output", str(tmp_path / "full")).returncode == 0
    n = json.loads((tmp_path / "full/manifest.json").read_text())["units"]
    assert n > 100

    def limit(soft: int, hard: int) -> Callable[[], None]:
        return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    r = prep(*common, "--output", str(tmp_path / "hard"), preexec_fn=limit(60, 60))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        f"bertforge: error: prep: dedup: the pass maps the {2 * n} files of its {n} units at once, but this process "
        "may open only "
        "60 files (ulimit -Hn): raise that limit, or prep with a larger unit_size (now 1KB)"
    ), r.stderr
    assert not list(tmp_path.glob("hard/.prep/dedup-*"))  # (before the work)
    r = prep(
        *common, "--output", str(tmp_path / "soft"), preexec_fn=limit(60, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    )
    assert r.returncode == 0, r.stderr
    assert tree(tmp_path / "soft") == tree(tmp_path / "full")


def test_a_document_longer_than_a_shard_spans_shards(tmp_path, sp_model) -> None:
    words = " ".join(f"token{i % 97} word{i % 13}" for i in range(20_000))
    (tmp_path / "long.txt").write_text("short doc before\n\n" + words + "\n\nshort doc after\n")
    out = tmp_path / "ds"
    r = prep(
        "--input",
        str(tmp_path / "long.txt"),
        "--output",
        str(out),
        "--tokenizer",
        str(sp_model),
        "shard_size=16KB",
        "block_size=4KB",
        "read_size=30000",
        "val_fraction=0",
    )
    assert r.returncode == 0, r.stderr
    man = json.loads((out / "manifest.json").read_text())
    assert len(man["splits"]["train"]["shards"]) > 3
    assert man["input"]["documents"]["read"] == 3 and man["input"]["documents"]["split"]["count"] == 1
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    got = shard_docs(out)
    assert len(got) == 3 and got[0] == sp.encode("short doc before") and got[2] == sp.encode("short doc after")
    assert sp.decode(got[1]) == words


def test_dedup_drops_every_later_copy_in_train_and_val_alike_and_min_chars_the_short(tmp_path, docs, sp_model):
    """``--dedup``: the first of each text kept, in input order, across files and formats; a document cut
    for length (a .jsonl piece by piece, a .txt one across read chunks) dropped whole; the output is the
    one of the input with the copies taken out by hand, the same whatever the workers, and no document of
    val/ is one of train/. ``min_chars``: the short ones dropped too (before the copies are looked for)."""
    short = [d for d in docs if 50 < len(d) < 1000][:240]
    long = " ".join(short[:30])  # one line of ~10 KB: cut into pieces of read_size (4 KB)
    files = {
        "a.txt": ["x"] + short[0:80] + [short[5], "ab ", short[10]],
        "b.jsonl": short[80:160] + [short[0], long, "x", short[150]],
        "c.txt": short[160:240] + [long, short[3], short[161]],
    }
    tiny = sum(len(d.strip()) < 5 for texts in files.values() for d in texts)  # (min_chars=5)
    seen: set[str] = set()
    kept = {
        name: [d for d in texts if len(d.strip()) >= 5 and not (d in seen or seen.add(d))]
        for name, texts in files.items()
    }
    n, unique = sum(map(len, files.values())), len(seen)  # (the docstrings repeat some of their own too)
    assert n - tiny - unique >= 7 and tiny == 3

    common = ["--tokenizer", str(sp_model), "--workers", "2", "read_size=4KB", "shard_size=20KB", "block_size=4KB"]
    raw, by_hand = write(tmp_path / "raw", files), write(tmp_path / "by_hand", kept)
    r = prep("--input", str(raw), "--output", str(tmp_path / "dedup"), "--dedup", "--strict", "val_fraction=0",
             "min_chars=5", *common)  # fmt: skip
    assert r.returncode == 0, r.stderr  # (a duplicate is no error under --strict: the config asked for it)
    said = f"prep: dedup: {n - tiny - unique} of {n - tiny} documents repeat an earlier one's text; dropped ("
    assert said in r.stderr, r.stderr
    acc = json.loads((tmp_path / "dedup/manifest.json").read_text())["input"]["documents"]
    assert acc["read"] == n and acc["written"] == unique, acc
    assert acc["skipped"]["duplicate"]["count"] == n - tiny - unique and acc["skipped"]["too_short"] == {
        "count": 3, "examples": [f"{raw}/a.txt:1", f"{raw}/a.txt:{1 + sum(d.count(chr(10)) + 2 for d in files['a.txt'][:-2])}",
                                 f"{raw}/b.jsonl:83"]}  # fmt: skip
    texts = files["a.txt"]
    first = next(i for i, d in enumerate(texts) if d in texts[:i])  # a.txt's first copy, at its first line
    line = 1 + sum(d.count("\n") + 2 for d in texts[:first])
    assert acc["skipped"]["duplicate"]["examples"][0] == f"{raw}/a.txt:{line}", acc
    assert (
        f"skipped duplicate: {n - tiny - unique} (first at " in r.stdout
        and "skipped too_short: 3 (first at " in r.stdout
    )
    r = prep("--input", str(by_hand), "--output", str(tmp_path / "plain"), "val_fraction=0", *common)
    assert r.returncode == 0, r.stderr
    mine, theirs = tree(tmp_path / "dedup"), tree(tmp_path / "plain")
    shards = [k for k in mine if k.startswith("train/")]
    assert len(shards) >= 3 and [mine[k] for k in shards] == [theirs.get(k) for k in shards]
    # with a val split, in whole units over 1 and 2 workers: the same bytes, and no text on both sides
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"val{workers}"
        args = ["--input", str(raw), "--output", str(out), "--dedup", "min_chars=5", *common, "--workers", workers]
        r = prep(*args, "val_fraction=0.3", "unit_size=2KB")
        assert r.returncode == 0 and (workers == "1" or "whole units each" in r.stderr), r.stderr
        outs.append(tree(out))
    assert outs[0] == outs[1]
    from data_prep.dedup import _duplicates
    from data_prep.errors import RunError

    (out / ".prep/duplicates.npy").write_bytes(b"not numpy")  # (a disk's fault): named, with what to do
    with pytest.raises(RunError, match=r"duplicates.npy: cannot read it \(.*\); delete it, and the same command"):
        _duplicates(str(out / ".prep/duplicates.npy"), 0)
    train, val = shard_docs(out, "train"), shard_docs(out, "val")
    assert len(val) > 30 and not {tuple(d) for d in train} & {tuple(d) for d in val}
    assert len(train) + len(val) == unique  # (the long document: pieces, one [SEP])
    # inspect --overlap counts what dedup dropped: none here; without dedup, the val documents that are
    # train documents (counted here on the test's own reading of the shards)
    said = run_cli("inspect", str(out), "--overlap", "-n", "0").stdout.splitlines()[-1]
    assert said == f"overlap: 0 of {len(val)} val documents are also train documents (the same token ids), 0 of " \
                   f"{sum(map(len, val)):,} val tokens (0.0%)", said  # fmt: skip
    plain = tmp_path / "plain_val"
    r = prep("--input", str(raw), "--output", str(plain), *common, "val_fraction=0.3", "unit_size=2KB")
    assert r.returncode == 0, r.stderr
    train = {tuple(d) for d in shard_docs(plain, "train")}
    both = [d for d in shard_docs(plain, "val") if tuple(d) in train]
    said = run_cli("inspect", str(plain), "--overlap", "-n", "0").stdout.splitlines()[-1]
    assert both and said.startswith(f"overlap: {len(both)} of ") and said.endswith("bertforge prep --dedup drops them")
    assert f"(the same token ids), {sum(map(len, both)):,} of " in said, said
    # --overlap OTHER: copies across datasets prepped apart (a blend's), which no prep's dedup sees
    other = tmp_path / "other"
    r = prep("--input", str(raw / "c.txt"), str(raw / "b.jsonl"), "--output", str(other), *common, "val_fraction=0")
    assert r.returncode == 0, r.stderr
    theirs = {tuple(d) for d in shard_docs(other)}

    def found(split: str) -> str:  # (counted on the test's own reading of the shards)
        docs = shard_docs(out, split)
        both = [len(d) for d in docs if tuple(d) in theirs]
        assert both
        total = sum(map(len, docs))
        return (f"{len(both)} of {len(docs)} {split} documents, {sum(both):,} of {total:,} {split} tokens "
                f"({sum(both) / total:.1%})")  # fmt: skip

    said = run_cli("inspect", str(out), "--overlap-with", str(other), "-n", "0").stdout.splitlines()[-2:]
    assert said[0].startswith("overlap: 0 of ") and said[1] == (
        f"overlap with {other}'s train documents: {found('val')}; {found('train')}"
    ), said
    man = json.loads((other / "manifest.json").read_text())
    man["tokenizer"]["sha256"] = "0" * 64  # (as another tokenizer's dataset says)
    (other / "manifest.json").write_text(json.dumps(man))
    for them, why in ((other, "field 'tokenizer.sha256' is 000000000000..., "), (out, "that is ")):
        r = run_cli("inspect", str(out), "--overlap-with", str(them), "-n", "0")
        assert r.returncode == 2 and why in r.stderr.splitlines()[-1] and not r.stdout, r.stderr
    from data_prep.config import PrepConfig

    too_long = PrepConfig(input=["x"], output="y", read_size="4KB", min_chars=1025)  # (a document read in
    assert refusal(too_long.validate) == "config key 'min_chars': 1025 is outside [0, read_size / 4]"  # chunks)


def test_dedup_against_drops_the_documents_of_datasets_prepped_before(tmp_path, docs, sp_model) -> None:
    """``--dedup-against DIR``: the documents whose text DIR kept (its ``document_hashes.npy``, which a
    prep with ``--dedup`` writes and its manifest lists) are dropped as duplicates too, with this input's
    own repeats; refused, naming the key or the file, without ``--dedup``, against a dataset prepped
    without it (or by an older bertforge), against the output itself, a folder that is no dataset, and
    where the file is damaged, of another shape than its manifest lists or missing."""
    texts = list(dict.fromkeys(d for d in docs if 50 < len(d) < 1000))[:100]

    write(tmp_path / "in", {"first.jsonl": texts[:60], "second.jsonl": [*texts[40:100], texts[90], texts[5]]})
    first, second = tmp_path / "in/first.jsonl", tmp_path / "in/second.jsonl"
    common = ["--tokenizer", str(sp_model), "--workers", "2", "val_fraction=0", "read_size=4KB", "block_size=4KB"]
    one, plain = tmp_path / "one", tmp_path / "plain"
    assert prep("--input", str(first), "--output", str(one), "--dedup", *common).returncode == 0
    assert prep("--input", str(first), "--output", str(plain), *common).returncode == 0
    man = json.loads((one / "manifest.json").read_text())
    assert man["documents"]["count"] == 60 and len(np.load(one / "document_hashes.npy")) == 60
    assert "documents" not in json.loads((plain / "manifest.json").read_text())
    two = tmp_path / "two"
    r = prep("--input", str(second), "--output", str(two), "--dedup", "--dedup-against", str(one), *common)
    assert r.returncode == 0, r.stderr
    assert f"prep: dedup: 1 of 62 documents repeat an earlier one's text, 21 more are documents of {one}; " in r.stderr
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert shard_docs(two) == [sp.encode(d) for d in texts[60:100]]  # (texts[90]'s copy: this input's repeat)
    theirs = json.loads((two / "manifest.json").read_text())
    assert theirs["input"]["documents"]["skipped"]["duplicate"]["count"] == 22
    assert theirs["documents"]["count"] == 40 and theirs["documents"]["against"] == [
        {"path": str(one), "sha256": man["documents"]["sha256"]}
    ]
    r = run_cli("inspect", str(two), "--verify", "-n", "0")  # (the file is listed and checked)
    assert r.returncode == 0 and (
        "  dedup: the hashes of the 40 texts kept in document_hashes.npy (a later prep's --dedup-against reads "
        f"them); also dropped: the texts of {one}\n" in r.stdout
    ), r.stdout
    refusals = {
        "needs dedup=true": ["--dedup-against", str(one)],
        f"{plain}/manifest.json: no field 'documents' (config key 'dedup_against')": ["--dedup", "--dedup-against", str(plain)],
        "is the output folder itself": ["--dedup", "--dedup-against", str(two)],
    }  # fmt: skip
    older = tmp_path / "older"  # a dedup prep of a bertforge that kept no hashes: its manifest without them
    shutil.copytree(one, older)
    (older / "manifest.json").write_text(json.dumps({k: v for k, v in man.items() if k != "documents"}))
    refusals["no field 'documents' (config key 'dedup_against'): " + f"{older} was prepped by a bertforge before "
             "2026-12-05, whose --dedup kept no hashes; prep it again with --dedup into a new folder"] = [
        "--dedup", "--dedup-against", str(older)]  # fmt: skip
    (one / "document_hashes.npy").write_bytes(b"damaged")
    refusals[f"{one}/document_hashes.npy: cannot read it ("] = ["--dedup", "--dedup-against", str(one)]
    for said, args in refusals.items():
        r = prep("--input", str(second), "--output", str(two), *args, *common)
        assert r.returncode == 2 and said in r.stderr.splitlines()[-1], (said, r.stderr)
    assert theirs == json.loads((two / "manifest.json").read_text())  # (refused before any work)
    # the same check, in this process: a folder that is no dataset, a hashes file of another shape, none
    from data_prep.config import PrepConfig
    from data_prep.prep import check_against

    def refused(other: Path) -> str:
        return refusal(check_against, PrepConfig(input=[str(second)], output=str(tmp_path / "x"), dedup=True,
                                                 dedup_against=[str(other)]))  # fmt: skip

    assert refused(tmp_path / "in") == (f"{tmp_path / 'in/manifest.json'}: no manifest; is {tmp_path / 'in'} a folder "
                                         "written by bertforge prep? (config key 'dedup_against')")  # fmt: skip
    np.save(two / "document_hashes.npy", np.zeros(39, np.uint64))  # (its manifest lists 40)
    assert refused(two) == (f"{two / 'document_hashes.npy'}: (39,) uint64, not the (40,) uint64 "
                            f"{two / 'manifest.json'} lists (config key 'dedup_against')")  # fmt: skip
    (two / "document_hashes.npy").unlink()
    assert refused(two) == (f"{two / 'document_hashes.npy'}: missing, listed in {two / 'manifest.json'} "
                            "(config key 'dedup_against')")  # fmt: skip


def test_near_dup_drops_the_near_copies_of_earlier_documents_and_keeps_those_sharing_less(tmp_path, docs, sp_model):
    """``--dedup --near-dup 0.8``: a later document whose word 5-grams are nearly an earlier one's (a
    word changed, a header added, the case and line breaks changed; a long .txt document read across
    chunks and its .jsonl copy) is dropped as ``near_duplicate``, an exact copy as ``duplicate``, and
    documents that share half their text are kept: the shards are those of the input with the near
    copies taken out by hand, the same over 1 and 2 workers. A later prep ``--dedup-against`` it drops
    the near copies of its documents (their bands kept in ``document_bands.npy``); refused against a
    dataset without bands or of another threshold, and near_dup without dedup."""
    rng = np.random.default_rng(5)
    vocab = sorted({w for d in docs for w in d.split() if w.isalpha()})
    assert len(vocab) > 2000

    def words(n: int) -> list[str]:
        return list(rng.choice(vocab, n))

    base = [words(100) for _ in range(30)]
    half = words(50)
    long = words(1600)  # (about 12 KB: read in 4 KB chunks)
    near = {  # each earlier document's near copy (its share of 5-grams, J: 0.98, 0.97, 1, 0.998)
        "word": " ".join(base[3][:-1] + ["changed"]),
        "header": "From the archive of the list: " + " ".join(base[7]),
        "case": "\n".join(" ".join(base[11][i : i + 10]).upper() for i in range(0, 100, 10)),
        "long": " ".join(long[:800] + ["changed"] + long[801:]),
    }
    kept_a = [" ".join(b) for b in base[:20]] + [" ".join(half + words(50)), " ".join(long)]
    kept_b = [" ".join(b) for b in base[20:]] + [" ".join(half + words(50))]
    files = {
        "a.txt": kept_a + [near["word"], near["case"]],
        "b.jsonl": kept_b[:5] + [near["header"], " ".join(base[3]), near["long"]] + kept_b[5:],
    }
    by_hand = {"a.txt": kept_a, "b.jsonl": kept_b}

    raw, hand = write(tmp_path / "raw", files), write(tmp_path / "hand", by_hand)
    common = ["--tokenizer", str(sp_model), "val_fraction=0", "read_size=4KB", "shard_size=20KB", "block_size=4KB"]
    trees = []
    for workers in ("1", "2"):
        out = tmp_path / f"near{workers}"
        args = ["--input", str(raw), "--output", str(out), "--dedup", "--near-dup", "0.8", "--workers", workers]
        r = run_cli("prep", *args, *common)  # (with its progress bars: the hash pass's, by whole units or chunks)
        assert r.returncode == 0, r.stderr
        assert "dedup: 100%" in r.stderr and "prep: 100%" in r.stderr, r.stderr
        assert "prep: dedup: 1 of 38 documents repeat an earlier one's text, 4 more are near copies (word 5-grams " \
               "shared, Jaccard >= 0.8, estimated); dropped (" in r.stderr, r.stderr  # fmt: skip
        trees.append(tree(out))
    assert trees[0] == trees[1]
    acc = json.loads((out / "manifest.json").read_text())["input"]["documents"]
    assert acc["read"] == 38 and acc["written"] == 33 and acc["skipped"]["duplicate"]["count"] == 1, acc
    assert acc["skipped"]["near_duplicate"] == {
        "count": 4, "examples": [f"{raw}/a.txt:45", f"{raw}/a.txt:47", f"{raw}/b.jsonl:6", f"{raw}/b.jsonl:8"]}, acc  # fmt: skip
    assert len(np.load(out / "document_hashes.npy")) == 33  # (the texts kept: no near copy's)
    r = prep("--input", str(hand), "--output", str(tmp_path / "plain"), "--workers", "2", *common)
    assert r.returncode == 0, r.stderr
    mine, theirs = trees[1], tree(tmp_path / "plain")
    shards = [k for k in mine if k.startswith("train/")]
    assert len(shards) >= 2 and [mine[k] for k in shards] == [theirs.get(k) for k in shards]
    # --dedup-against a dataset prepped with --near-dup: near copies of its documents go too (its
    # document_bands.npy and document_marks.npy: the band keys and marks of the documents it kept,
    # listed in its manifest and verified)
    near_files = json.loads((out / "manifest.json").read_text())["documents"]["near"]
    assert near_files == {"file": "document_bands.npy", "sha256": near_files["sha256"], "marks": "document_marks.npy",
                          "marks_sha256": near_files["marks_sha256"], "near_dup": 0.8, "bands": [14, 9],
                          "layout": "band", "scheme": "minhash-1"}  # fmt: skip
    assert np.load(out / "document_bands.npy").shape == (14, 33)  # (a row a band: a band's keys together)
    assert np.load(out / "document_marks.npy").shape == (33, 128)
    r = run_cli("inspect", str(out), "--verify", "-n", "0")
    assert r.returncode == 0 and "texts kept in document_hashes.npy and their MinHash bands and marks in " \
                                 "document_bands.npy, document_marks.npy (near_dup=0.8) (a later prep's" in r.stdout, \
        r.stdout  # fmt: skip
    later = [" ".join(base[0][:-1] + ["again"]), " ".join(words(100)), " ".join(base[25]).upper(), near["word"]]
    (tmp_path / "later.txt").write_text("\n\n".join(later) + "\n")
    args = ["--input", str(tmp_path / "later.txt"), "--dedup", "--dedup-against", str(out), *common]
    r = prep(*args, "--output", str(tmp_path / "later"), "--near-dup", "0.8")
    assert r.returncode == 0, r.stderr
    assert f"prep: dedup: 0 of 4 documents repeat an earlier one's text, 0 more are documents of {out}, 3 more are " \
           f"near copies (word 5-grams shared, Jaccard >= 0.8, estimated), 3 of them of documents of {out}; " \
           "dropped (" in r.stderr, r.stderr  # fmt: skip
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert shard_docs(tmp_path / "later") == [sp.encode(later[1])]
    # a dataset of an older bertforge, whose document_bands.npy holds a row a document (no 'layout'):
    # read as such, the same near copies dropped
    older = tmp_path / "older"
    shutil.copytree(out, older)
    np.save(older / "document_bands.npy", np.ascontiguousarray(np.load(out / "document_bands.npy").T))
    man = json.loads((older / "manifest.json").read_text())
    del man["documents"]["near"]["layout"]
    man["documents"]["near"]["sha256"] = hashlib.sha256((older / "document_bands.npy").read_bytes()).hexdigest()
    (older / "manifest.json").write_text(json.dumps(man))
    assert run_cli("inspect", str(older), "--verify", "-n", "0").returncode == 0
    r = prep(*args[:4], str(older), *common, "--output", str(tmp_path / "later-older"), "--near-dup", "0.8")
    assert r.returncode == 0 and f"3 of them of documents of {older}; dropped (" in r.stderr, r.stderr
    assert shard_docs(tmp_path / "later-older") == [sp.encode(later[1])]
    exact = tmp_path / "exact"  # a dataset of --dedup alone: no bands to compare with
    assert prep("--input", str(hand), "--output", str(exact), "--dedup", *common).returncode == 0
    for against, threshold, said in (
        (exact, "0.8", f"{exact}/manifest.json: no field 'documents.near' (config key 'near_dup'): {exact} was prepped "
                       "without --near-dup, which keeps its documents' MinHash bands; prep it again with --near-dup 0.8,"
                       " or leave near_dup out here (exact copies alone)"),
        (out, "0.5", f"{out}/manifest.json: field 'documents.near.near_dup' is 0.8 but config key 'near_dup' is 0.5: "
                     "near copies compare only under one threshold (its bands)"),
    ):  # fmt: skip
        r = prep(*args[:4], str(against), *common, "--output", str(tmp_path / "refused"), "--near-dup", threshold)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(said), r.stderr
    assert not (tmp_path / "refused").exists()
    from data_prep.config import PrepConfig

    banded = tmp_path / "banded"  # a dataset whose bertforge banded 0.8 otherwise (its keys: other hashes)
    shutil.copytree(out, banded)
    man = json.loads((banded / "manifest.json").read_text())
    man["documents"]["near"]["bands"] = [9, 13]
    (banded / "manifest.json").write_text(json.dumps(man))
    from data_prep.prep import check_against

    checked = PrepConfig(input=["x"], output=str(tmp_path / "y"), dedup=True, dedup_against=[str(banded)], near_dup=0.8)
    assert refusal(check_against, checked) == (
        f"{banded}/manifest.json: field 'documents.near.bands' is [9, 13] but this bertforge bands near_dup=0.8 as "
        f"[14, 9]: band keys compare only under the same bands; prep {banded} again"
    )
    man["documents"]["near"]["bands"] = [14, 9]  # signed by another scheme (other shingles or hashes): refused;
    man["documents"]["near"]["scheme"] = "minhash-2"  # without the field (a bertforge before it): taken as ours
    (banded / "manifest.json").write_text(json.dumps(man))
    assert refusal(check_against, checked) == (
        f"{banded}/manifest.json: field 'documents.near.scheme' is 'minhash-2' but this bertforge signs documents as "
        f"'minhash-1': band keys and marks compare only under one scheme; prep {banded} again"
    )
    del man["documents"]["near"]["scheme"]
    man["documents"]["near"]["layout"] = "column"  # (a later bertforge's layout of the band keys: refused)
    (banded / "manifest.json").write_text(json.dumps(man))
    assert refusal(check_against, checked) == (
        f"{banded}/manifest.json: field 'documents.near.layout' is 'column' but this bertforge reads 'band' (a row a "
        f"band) or none (a row a document, an older bertforge's): prep {banded} again"
    )
    man["documents"]["near"]["layout"] = "band"
    (banded / "manifest.json").write_text(json.dumps(man))
    check_against(checked)
    r = prep("--input", str(raw), "--output", str(tmp_path / "x"), "--near-dup", "0.8", *common)
    assert r.returncode == 2 and r.stderr.strip().endswith("config key 'near_dup' needs dedup=true (--dedup): the "
                                                           "same hash pass finds both"), r.stderr  # fmt: skip
    said = refusal(PrepConfig(input=["x"], output="y", dedup=True, near_dup=1.0).validate)
    assert said == "config key 'near_dup': 1.0 is outside [0, 1) (0.8: 80% of word 5-grams shared)"


def test_bad_input_account_balances(tmp_path, sp_model) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_bytes(b'{"text": "good one"}\n{oops\n{"txt": "x"}\n{"text": ""}\n{"text": "bad \xff"}\n')
    (src / "b.txt").write_bytes(b"\x00\x01\x02binary")
    (src / "c.txt").write_bytes(b"")
    (src / "d.bin").write_bytes(b"??")
    (src / "e.txt").write_bytes(b"plain doc\n\nanother\n")
    out = tmp_path / "ds"
    r = prep("--input", str(src), "--output", str(out), "--tokenizer", str(sp_model))
    assert r.returncode == 0, r.stderr
    acc = json.loads((out / "manifest.json").read_text())["input"]
    docs = acc["documents"]
    assert docs["read"] == 7 and docs["written"] == 4
    assert {k: v["count"] for k, v in docs["skipped"].items()} == {"invalid_json": 1, "missing_field": 1, "empty": 1}
    assert docs["read"] == docs["written"] + sum(v["count"] for v in docs["skipped"].values())
    assert docs["skipped"]["invalid_json"]["examples"] == [f"{src}/a.jsonl:2"]
    assert docs["repaired_utf8"]["examples"] == [f"{src}/a.jsonl:5"]
    assert acc["files"]["skipped"]["binary_file"]["examples"] == [f"{src}/b.txt"]
    assert acc["files"]["skipped"]["empty_file"]["examples"] == [f"{src}/c.txt"]
    assert acc["files"]["ignored"]["unsupported_type"]["examples"] == [f"{src}/d.bin"]
    assert "skipped invalid_json: 1" in r.stdout

    strict = prep("--input", str(src), "--output", str(tmp_path / "strict"), "--tokenizer", str(sp_model), "--strict")
    assert strict.returncode == 2
    errors = [line for line in strict.stderr.splitlines() if line.startswith("bertforge: error")]
    assert errors == [f"bertforge: error: {src}/a.jsonl:2: invalid json (--strict)"]
    # an input of which no document is kept (a .jsonl's text under another key): refused in one line that
    # says why, with no manifest, by the tokenizer's sample where it trains one, else once the units are done
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.jsonl").write_text('{"body": "the text"}\n{"body": "more text"}\n')
    (other / "b.txt").write_bytes(b"\x00\x01\x02binary")
    why = (f"2 documents read, all skipped (missing_field 2, first at {other}/x.jsonl:1); files skipped or ignored: "
           f"binary_file 1, first {other}/b.txt; a .jsonl line's text is read from field 'text' (--text-field KEY "
           "names another)")  # fmt: skip
    for extra, said in (([], f"tokenizer: no text to train on in the input's sample: {why}"),
                        (["--tokenizer", str(sp_model)], f"input {other}: no document written: {why}")):  # fmt: skip
        r = prep("--input", str(other), "--output", str(tmp_path / "none"), *extra)
        errors = [line for line in r.stderr.splitlines() if line.startswith("bertforge: error")]
        assert r.returncode == 2 and errors == [f"bertforge: error: {said}"], r.stderr
        assert not (tmp_path / "none/manifest.json").exists()


@pytest.mark.parametrize(
    "case", ["missing", "not_empty", "bad_tokenizer", "other_config", "input_changed", "vocab_too_big"]
)
def test_refusals_are_one_line_exit_2_before_any_work(tmp_path, corpus, sp_model, case) -> None:
    root, _ = corpus
    out = tmp_path / "ds"
    args = ["--input", str(root / "a.txt"), "--output", str(out), "--tokenizer", str(sp_model)]
    if case == "missing":
        args[1] = str(tmp_path / "nope.txt")
        needle = "nope.txt: no such file"
    elif case == "not_empty":
        out.mkdir()
        (out / "precious.txt").write_text("keep me")
        needle = "not empty"
    elif case == "bad_tokenizer":
        bad = tmp_path / "bad.model"
        bad.write_bytes(b"not a model")
        args[-1] = str(bad)
        needle = "bad.model: not a SentencePiece model"
    elif case == "other_config":
        assert prep(*args).returncode == 0
        args += ["--seq-len", "64"]
        needle = "config key 'seq_len'"
    elif case == "input_changed":  # the same names, a file rewritten since
        (tmp_path / "in.txt").write_text((root / "a.txt").read_text())
        args[1] = str(tmp_path / "in.txt")
        assert prep(*args).returncode == 0
        (tmp_path / "in.txt").write_text((root / "a.txt").read_text() + "\n\none more document\n")
        needle = f"{out}: holds a prep made with a different set of input files (names, sizes or modification times)"
    else:
        args = ["--input", str(root / "a.txt"), "--output", str(out), "--dedup", "--near-dup", "0.8", "--vocab-size",
                "30000"]  # fmt: skip
        needle = "tokenizer.vocab_size"
    r = prep(*args)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("bertforge: error: ") and needle in errors[0], r.stderr
    if case == "not_empty":
        assert [p.name for p in out.iterdir()] == ["precious.txt"]
    if case in ("missing", "bad_tokenizer"):
        assert not out.exists()
    if case == "vocab_too_big":  # no tokenizer nor shard was made, so a corrected command may reuse the folder;
        assert (out / ".prep/near_duplicates.npy").is_file()  # the dedup pass before the tokenizer step holds
        args[-1] = "1000"  # (another tokenizer is no other dedup), a dedup of other settings is refused
        other = prep(*args[:6], "0.5", *args[7:])
        assert other.returncode == 2 and other.stderr.strip().endswith(
            f"{out}: holds a prep made with a different config key 'near_dup'; choose a new --output folder or "
            "delete this one"), other.stderr  # fmt: skip
        again = prep(*args)
        assert again.returncode == 0 and "prep: dedup:" not in again.stderr, again.stderr
        fresh = tmp_path / "fresh"
        assert prep(*args[:3], str(fresh), *args[4:]).returncode == 0
        assert tree(out) == tree(fresh)


def test_inspect_decodes_samples(tmp_path, corpus, sp_model, docs) -> None:
    root, ordered = corpus
    out = tmp_path / "ds"
    assert (
        prep("--input", str(root), "--output", str(out), "--tokenizer", str(sp_model), "val_fraction=0").returncode == 0
    )
    r = run_cli("inspect", str(out), "-n", "2")
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and "tokens" in r.stdout
    assert r.stdout.count("--- train sample") == 2
    first_words = " ".join(ordered[0].split()[:3])
    assert first_words in r.stdout
    bad = run_cli("inspect", str(tmp_path))
    assert bad.returncode == 2 and "manifest" in bad.stderr


def test_builtin_corpus_is_the_default_and_needs_no_download(tmp_path) -> None:
    out = tmp_path / "py"
    r = prep(str(REPO / "configs/prep/python-docs.yaml"), f"output={out}", "--workers", "2", cwd=REPO)
    assert r.returncode == 0, r.stderr
    man = json.loads((out / "manifest.json").read_text())
    assert man["inputs"][0]["path"] == "builtin:python-docs"
    assert man["input"]["documents"]["read"] > 5000 and man["splits"]["val"]["sequences"] > 20
    assert man["tokenizer"]["vocab_size"] == 8192 and man["input"]["bytes_read"] > 2_000_000
    assert len(man["splits"]["train"]["shards"]) >= 4  # enough for 2 ranks x 2 loader workers


def test_manifest_check_names_the_field_that_disagrees(tmp_path, corpus, sp_model) -> None:
    from data_prep import manifest
    from data_prep.errors import UserError

    root, _ = corpus
    out = tmp_path / "ds"
    assert prep("--input", str(root / "a.txt"), "--output", str(out), "--tokenizer", str(sp_model)).returncode == 0
    man = manifest.load(out)
    sha = man["tokenizer"]["sha256"]
    manifest.check(man, out, vocab_size=1000, seq_len=128, tokenizer_sha256=sha)  # agrees: no error
    for kwargs, field in [
        ({"vocab_size": 32768}, "tokenizer.vocab_size"),
        ({"seq_len": 512}, "seq_len"),
        ({"tokenizer_sha256": "0" * 64}, "tokenizer.sha256"),
    ]:
        with pytest.raises(UserError, match=rf"manifest.json: field '{field}'"):
            manifest.check(man, out, **kwargs)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match=r"manifest.json:1: manifest is not valid JSON"):
        manifest.load(out)


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_a_large_file_is_cut_into_ranges_at_document_starts(tmp_path, docs, sp_model, kind) -> None:
    """Ranges of one big file go to different workers; nothing is lost, split or counted twice."""
    path = tmp_path / f"big.{kind}"
    if kind == "txt":
        path.write_text("\n\n\n".join(docs) + "\n")
    else:
        lines = [json.dumps({"text": d}) for d in docs]
        bad_line = len(lines) * 3 // 4  # an invalid line well inside a later range
        lines.insert(bad_line, "{oops")
        path.write_text("\n".join(lines) + "\n")
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        r = prep(
            "--input",
            str(path),
            "--output",
            str(out),
            "--tokenizer",
            str(sp_model),
            "--workers",
            workers,
            "unit_size=32KB",
            "val_fraction=0",
        )
        assert r.returncode == 0, r.stderr
        outs.append(tree(out))
    assert outs[0] == outs[1]
    man = json.loads(outs[0]["manifest.json"])
    assert man["units"] >= 6
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert shard_docs(tmp_path / "w2") == [sp.encode(d) for d in docs]
    acc = man["input"]
    assert acc["files"]["read"] == 1 and acc["bytes_read"] == path.stat().st_size
    if kind == "jsonl":
        assert acc["documents"]["skipped"]["invalid_json"]["examples"] == [f"{path}:{bad_line + 1}"]
        assert acc["documents"]["read"] == len(docs) + 1
    else:
        assert acc["documents"]["read"] == len(docs)


def test_tokenizer_sample_pass_is_bounded(tmp_path, corpus) -> None:
    import re

    root, _ = corpus
    counts = []
    for name, extra in (("all", []), ("bounded", ["tokenizer.sample_bytes=40KB", "read_size=4KB"])):
        r = prep(
            "--input", str(root), "--output", str(tmp_path / name), "--vocab-size", "500", "unit_size=30KB", *extra
        )
        assert r.returncode == 0, r.stderr
        counts.append(int(re.search(r"on ([\d,]+) sampled lines", r.stderr).group(1).replace(",", "")))
    assert counts[1] < counts[0] / 2  # read a little of every unit, not the whole input


def test_prep_imports_neither_torch_nor_deepspeed() -> None:
    """data_prep never imports torch.distributed or deepspeed; its workers skip torch entirely."""
    assert heavy_imports("data_prep.prep, data_prep.encode", {"torch", "deepspeed", "webdataset"}) == []


_FAULTS_AROUND_PREP = """
import resource, sys
import numpy as np
np._core.multiarray._set_madvise_hugepage(False)  # (4 kB pages: numpy asks for 2 MB ones for arrays this big)
from data_prep.config import PrepConfig, TokenizerConfig
from data_prep.prep import prep

def faults():  # minor page faults of five 64 MB arrays, each allocated, written and freed
    for _ in range(10):  # (the heap grows to what the loop needs first)
        np.ones(64 << 20, np.uint8)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        np.ones(64 << 20, np.uint8)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

before = faults()
prep(PrepConfig(input=[sys.argv[1]], output=sys.argv[2], tokenizer=TokenizerConfig(path=sys.argv[3]), workers=1),
     progress=False)
print(before, faults())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a setting of glibc's malloc")
def test_prep_keeps_the_memory_it_frees_for_its_next_chunks(tmp_path, corpus, sp_model) -> None:
    """prep's main pass sets its process's malloc (and so the workers it forks) to keep freed memory
    (``data_prep.malloc.keep_freed_memory``): a freed 64 MB array's memory then serves the next
    one, where before it was a fresh mapping, page-faulted in again (16,384 faults in 4 kB pages)."""
    args = [str(corpus[0]), str(tmp_path / "out"), str(sp_model)]
    r = subprocess.run([sys.executable, "-c", _FAULTS_AROUND_PREP, *args], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    before, after = map(int, r.stdout.split()[-2:])
    assert before >= 5 * 16384 and after * 10 < before, r.stdout


def test_rows_and_band_keys_of_several_arrays_are_read_as_from_their_join() -> None:
    from data_prep.dedup import _Bands, _Rows

    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 1 << 60, (n, 3), dtype=np.uint64) for n in (5, 0, 17, 9)]
    rows, joined = _Rows(parts), np.concatenate(parts)
    index = rng.integers(0, len(joined), 100)
    assert len(rows) == len(joined) and (rows[index] == joined[index]).all()
    assert (_Rows(parts[:1])[index % 5] == parts[0][index % 5]).all()
    older = [p.T for p in parts[2:]]  # (an older dataset's keys, a row a document, are read as .T)
    bands = _Bands([np.ascontiguousarray(p.T) for p in parts[:2]] + older)
    assert len(bands) == len(joined) and bands.shape == (31, 3)
    assert all((bands.column(i) == joined[:, i]).all() for i in range(3))
