"""The dataset folder's ``manifest.json``: what the shards hold and how they were made.

The trainer reads it to find the shards and refuses a dataset whose tokenizer, vocabulary,
special ids or sequence length disagree with its own config (:func:`check`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_prep import builtin, neardup, tokenizer
from data_prep.config import PrepConfig
from data_prep.corpus import Account, InputFile
from data_prep.errors import UserError
from data_prep.shards import token_dtype
from launch.config import to_dict

MANIFEST = "manifest.json"
STATE = ".prep"  # (a prep's work in progress: its config keys, units' records, the dedup pass's files)
TOKENIZER = "tokenizer.model"
DOCUMENTS = "document_hashes.npy"  # (``dedup``: the 64-bit hashes of the text of the documents kept, sorted)
BANDS = "document_bands.npy"  # (``near_dup``: the MinHash band keys of the documents kept, a row a band)
MARKS = "document_marks.npy"  # (``near_dup``: their signatures' marks, a row each)
BANDS_LAYOUT = "band"
"""The manifest's ``documents.near.layout``: :data:`BANDS` holds a row a band (``(bands, documents)``),
so that a band's keys, which the clustering reads a band at a time, lie together. A manifest
without it (an older bertforge's, to 2026-12-05): a row a document."""
FORMAT = "bertforge.shards/1"


def output_config(cfg: PrepConfig) -> dict:
    """The config as the output depends on it: ``workers`` changes speed, never bytes, and
    ``output`` is where the folder was made, not what it holds (folders can be moved)."""
    d = to_dict(cfg)
    del d["workers"], d["output"]
    return d


def build(
    cfg: PrepConfig, files: list[InputFile], discovered: Account, units: list[dict], tok_path: Path, vocab_size: int
) -> dict:
    """Join the units' records, in order, into the manifest."""
    account = Account()
    account.merge(discovered)
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    for unit in units:
        account.merge(Account.from_dict(unit["input"]))
        for name in splits:
            splits[name].extend(unit["splits"][name])
    return {
        "format": FORMAT,
        "seq_len": cfg.seq_len,
        "dtype": token_dtype(vocab_size).name,
        "tokenizer": {
            "file": TOKENIZER,
            "sha256": tokenizer.sha256(tok_path),
            "type": cfg.tokenizer.type.value if not cfg.tokenizer.path else "given",
            "vocab_size": vocab_size,
            "special_ids": tokenizer.special_ids(),
        },
        "splits": {
            name: {
                "shards": shards,
                "sequences": sum(s["sequences"] for s in shards),
                "tokens": sum(s["tokens"] for s in shards),
                "pad_tokens": sum(s["pad_tokens"] for s in shards),
                "bytes": sum(s["bytes"] for s in shards),
            }
            for name, shards in splits.items()
        },
        "units": len(units),
        "inputs": [
            {
                "path": f.path,
                "kind": f.kind,
                "compression": f.compression,
                "bytes": f.size,
                **({"source": builtin.describe()} if f.kind == "builtin" else {}),
            }
            for f in files
        ],
        "input": account.to_dict(),
        **({"documents": documents(cfg, tok_path.parent)} if cfg.dedup else {}),
        "config": output_config(cfg),
    }


def documents(cfg: PrepConfig, folder: Path) -> dict:
    """The manifest's ``documents`` (``dedup``): the file of the hashes of the text of the documents
    kept, which a later prep's ``dedup_against`` reads, their count, and the datasets dropped from it;
    with ``near_dup``, ``near``: the files of their band keys (``layout``: a row a band) and marks,
    the threshold, ``[bands, rows]`` and the signing's :data:`neardup.SCHEME`."""
    path = folder / DOCUMENTS
    out = {
        "file": DOCUMENTS,
        "sha256": tokenizer.sha256(path),
        "count": int(np.load(path, mmap_mode="r").shape[0]),
        "against": [{"path": d, "sha256": against(d)[1]["sha256"]} for d in cfg.dedup_against],
    }
    if cfg.near_dup:
        out["near"] = {"file": BANDS, "sha256": tokenizer.sha256(folder / BANDS), "marks": MARKS,
                       "marks_sha256": tokenizer.sha256(folder / MARKS), "near_dup": cfg.near_dup,
                       "bands": list(neardup.candidate_bands(cfg.near_dup)), "layout": BANDS_LAYOUT,
                       "scheme": neardup.SCHEME}  # fmt: skip
    return out


def against(folder: str | Path) -> tuple[Path, dict]:
    """A dataset of ``dedup_against``: the path of its document hashes and its manifest's
    ``documents``; refused, naming the file or field, where it was prepped without ``dedup``
    (:func:`theirs` reads the files)."""
    try:
        man = load(folder)
    except UserError as err:
        raise UserError(f"{err} (config key 'dedup_against')") from None
    if "documents" not in man:
        why = ("by a bertforge before 2026-12-05, whose --dedup kept no hashes" if man["config"].get("dedup")
               else "without --dedup, which keeps its documents' hashes")  # fmt: skip
        raise UserError(
            f"{Path(folder) / MANIFEST}: no field 'documents' (config key 'dedup_against'): {folder} was prepped "
            f"{why}; prep it again with --dedup into a new folder"
        )
    path = Path(folder) / man["documents"]["file"]
    if not path.is_file():
        raise UserError(f"{path}: missing, listed in {Path(folder) / MANIFEST} (config key 'dedup_against')")
    return path, man["documents"]


def theirs(folder: str | Path, near_dup: float = 0.0) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """What a ``dedup_against`` dataset kept, mapped, not read (a check before the work reads the
    headers alone, the hash pass reads them once): its documents' text hashes and, for a prep with
    ``near_dup``, their band keys (a row a band) and marks (a row a document; None without).
    Refused, naming the field or file, where that dataset was prepped without ``near_dup``, with
    another threshold, or by a bertforge that signed or banded it otherwise (its band keys are
    others) or laid them out otherwise, or a file cannot be read or has another shape than its
    manifest says."""
    path, listed = against(folder)
    count, where = listed["count"], Path(folder) / MANIFEST
    hashes = _mapped(path, np.uint64, (count,), where)
    if not near_dup:
        return hashes, None, None
    near = listed.get("near")
    if near is None:
        raise UserError(
            f"{where}: no field 'documents.near' (config key 'near_dup'): {folder} was prepped without "
            f"--near-dup, which keeps its documents' MinHash bands; prep it again with --near-dup {near_dup:g}, "
            "or leave near_dup out here (exact copies alone)"
        )
    if near["near_dup"] != near_dup:
        raise UserError(
            f"{where}: field 'documents.near.near_dup' is {near['near_dup']:g} but config key 'near_dup' is "
            f"{near_dup:g}: near copies compare only under one threshold (its bands)"
        )
    if (scheme := near.get("scheme", "minhash-1")) != neardup.SCHEME:  # (a bertforge that signed otherwise)
        raise UserError(
            f"{where}: field 'documents.near.scheme' is {scheme!r} but this bertforge signs documents as "
            f"{neardup.SCHEME!r}: band keys and marks compare only under one scheme; prep {folder} again"
        )
    if near["bands"] != list(ours := neardup.candidate_bands(near_dup)):  # (a bertforge that banded otherwise)
        raise UserError(
            f"{where}: field 'documents.near.bands' is {near['bands']} but this bertforge bands near_dup="
            f"{near_dup:g} as {list(ours)}: band keys compare only under the same bands; prep {folder} again"
        )
    if (layout := near.get("layout")) not in (BANDS_LAYOUT, None):  # (a later bertforge's)
        raise UserError(
            f"{where}: field 'documents.near.layout' is {layout!r} but this bertforge reads {BANDS_LAYOUT!r} (a row "
            f"a band) or none (a row a document, an older bertforge's): prep {folder} again"
        )
    if layout == BANDS_LAYOUT:
        bands = _mapped(Path(folder) / near["file"], np.uint64, (near["bands"][0], count), where)
    else:  # (an older bertforge's, a row a document: read as such, a band's keys apart)
        bands = _mapped(Path(folder) / near["file"], np.uint64, (count, near["bands"][0]), where).T
    return hashes, bands, _mapped(Path(folder) / near["marks"], np.uint8, (count, neardup.PERMUTATIONS), where)


def _mapped(path: Path, dtype: type, shape: tuple[int, ...], where: Path) -> np.ndarray:
    """The ``.npy`` file ``path``, mapped, with the dtype and shape its manifest ``where`` lists."""
    try:
        rows = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read it ({str(err).split('. ')[0]}; config key 'dedup_against')") from None
    if rows.dtype != dtype or rows.shape != shape:
        raise UserError(f"{path}: {rows.shape} {rows.dtype}, not the {shape} {np.dtype(dtype).name} {where} lists "
                        "(config key 'dedup_against')")  # fmt: skip
    return rows


def load(folder: str | Path) -> dict:
    """Read a dataset folder's manifest, refusing a folder that is not a finished prep."""
    path = Path(folder) / MANIFEST
    if not path.is_file() and (Path(folder) / STATE / "state.json").is_file():
        raise UserError(
            f"{path}: no manifest yet: {folder} holds a bertforge prep not finished (bertforge inspect {folder} "
            "says how far it went; the same bertforge prep command resumes it)"
        )
    if not path.is_file():
        raise UserError(f"{path}: no manifest; is {folder} a folder written by bertforge prep?")
    try:
        man = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: manifest is not valid JSON ({err.msg})") from None
    if man.get("format") != FORMAT:
        raise UserError(f"{path}: field 'format' is {man.get('format')!r}, expected {FORMAT!r}")
    return man


def check(
    man: dict,
    folder: str | Path,
    *,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    tokenizer_sha256: str | None = None,
) -> None:
    """Refuse a manifest that disagrees with a consumer's config, naming the field."""
    path = Path(folder) / MANIFEST
    want = {"tokenizer.vocab_size": vocab_size, "seq_len": seq_len, "tokenizer.sha256": tokenizer_sha256}
    have = {
        "tokenizer.vocab_size": man["tokenizer"]["vocab_size"],
        "seq_len": man["seq_len"],
        "tokenizer.sha256": man["tokenizer"]["sha256"],
    }
    for field, value in want.items():
        if value is not None and value != have[field]:
            raise UserError(f"{path}: field '{field}' is {have[field]!r} but the config expects {value!r}")
    if man["tokenizer"]["special_ids"] != tokenizer.special_ids():
        raise UserError(
            f"{path}: field 'tokenizer.special_ids' is {man['tokenizer']['special_ids']}, "
            f"expected {tokenizer.special_ids()}"
        )


def verify(man: dict, folder: str | Path, progress: bool = False) -> tuple[int, int, list[str]]:
    """Check every file the manifest lists (the tokenizer and each shard) for its size and sha256.

    Returns ``(files, bytes, problems)``: one line per file that is missing, of another size, or
    of another checksum (damaged, or changed since prep wrote it)."""
    from tqdm import tqdm

    folder = Path(folder)
    listed = [(man["tokenizer"]["file"], None, man["tokenizer"]["sha256"])]
    if "documents" in man:
        listed.append((man["documents"]["file"], None, man["documents"]["sha256"]))
        if near := man["documents"].get("near"):
            listed += [(near["file"], None, near["sha256"]), (near["marks"], None, near["marks_sha256"])]
    listed += [
        (s["path"], s["bytes"], s["sha256"]) for split in ("train", "val") for s in man["splits"][split]["shards"]
    ]
    total = sum(size or 0 for _, size, _ in listed)
    problems = []
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=not progress) as bar:
        for name, size, digest in listed:
            path = folder / name
            found = path.stat().st_size if path.is_file() else None
            if found is None:
                problems.append(f"{path}: missing")
            elif size is not None and found != size:
                problems.append(f"{path}: {found:,} bytes, the manifest says {size:,}")
            elif tokenizer.sha256(path) != digest:
                problems.append(f"{path}: sha256 differs from the manifest's (damaged, or changed after prep)")
            bar.update(size or 0)
    return len(listed), total, problems


def compared(man: dict, folder: str | Path, others: list[str]) -> list[tuple[Path, dict]]:
    """The datasets ``bertforge inspect DIR --overlap-with OTHER ...`` compares DIR with, and their
    manifests; refused, naming the field, where one is DIR itself or has another tokenizer (token ids
    compare only under one)."""
    out = []
    for other in map(Path, others):
        theirs = load(other)
        if other.resolve() == Path(folder).resolve():
            raise UserError(f"--overlap-with {other}: that is {folder} itself (--overlap compares its splits)")
        if theirs["tokenizer"]["sha256"] != man["tokenizer"]["sha256"]:
            raise UserError(
                f"{other / MANIFEST}: field 'tokenizer.sha256' is {theirs['tokenizer']['sha256'][:12]}..., "
                f"{Path(folder) / MANIFEST}'s is {man['tokenizer']['sha256'][:12]}...: token ids compare only under "
                "one tokenizer (bertforge prep --tokenizer names it)"
            )
        out.append((other, theirs))
    return out


def overlap(man: dict, folder: str | Path, others: list[tuple[Path, dict]] = ()) -> list[str]:
    """``bertforge inspect DIR --overlap``: how many val documents are also train documents (the
    same token ids), and their share of the val tokens: what a copy of training text in val/ does
    to the eval loss (``dedup`` drops them at prep). With ``--overlap-with`` (``others``, checked by
    :func:`compared`), a line more for each: how many of DIR's val and train documents are train
    documents of that one (a blend's datasets, prepped apart: copies no prep's dedup saw)."""
    from data_prep.shards import document_hashes  # (webdataset's reader: imported when asked for)

    def split(where: Path, man: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
        return document_hashes([where / s["path"] for s in man["splits"][name]["shards"]])

    def found(docs: tuple[np.ndarray, np.ndarray], train: np.ndarray, what: str, are: str = "") -> str:
        hashes, lengths = docs
        both = np.isin(hashes, train)
        tokens, total = int(lengths[both].sum()), int(lengths.sum())
        return (f"{int(both.sum()):,} of {len(hashes):,} {what} documents{are}, {tokens:,} of {total:,} "
                f"{what} tokens ({tokens / max(1, total):.1%})")  # fmt: skip

    folder = Path(folder)
    val, train = split(folder, man, "val"), split(folder, man, "train")
    said = found(val, train[0], "val", " are also train documents (the same token ids)")
    lines = [f"overlap: {said}" + ("" if said.startswith("0 ") else "; bertforge prep --dedup drops them")]
    for other, theirs in others:
        there = split(other, theirs, "train")[0]
        lines.append(f"overlap with {other}'s train documents: {found(val, there, 'val')}; "
                     f"{found(train, there, 'train')}")  # fmt: skip
    return lines


def summary(man: dict, seconds: float | None = None) -> str:
    """A human-readable table of a manifest: splits, tokenizer and the input account."""
    rows = [("split", "shards", "sequences", "tokens", "pad", "bytes", "bytes/token")]
    for name, s in man["splits"].items():
        stored = s["tokens"] + s["pad_tokens"]
        rows.append(
            (
                name,
                f"{len(s['shards']):,}",
                f"{s['sequences']:,}",
                f"{s['tokens']:,}",
                f"{s['pad_tokens']:,}",
                f"{s['bytes']:,}",
                f"{s['bytes'] / stored:.3f}" if stored else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    tok = man["tokenizer"]
    lines.append(
        f"tokenizer: {tok['type']}, {tok['vocab_size']:,} pieces, seq_len {man['seq_len']}, "
        f"dtype {man['dtype']}, sha256 {tok['sha256'][:12]}"
    )
    acc = man["input"]
    docs = acc["documents"]
    skipped = sum(r["count"] for r in docs["skipped"].values())
    lines.append(
        f"documents: {docs['read']:,} read = {docs['written']:,} written + {skipped:,} skipped"
        f"; {docs['split']['count']:,} split for length, {docs['repaired_utf8']['count']:,} with "
        "invalid UTF-8 replaced"
    )
    for reason, r in docs["skipped"].items():
        lines.append(f"  skipped {reason}: {r['count']:,} (first at {', '.join(r['examples'][:3])})")
    if kept := man.get("documents"):
        lines.append(
            f"  dedup: the hashes of the {kept['count']:,} texts kept in {kept['file']}"
            + (
                f" and their MinHash bands and marks in {near['file']}, {near['marks']} (near_dup={near['near_dup']:g})"
                if (near := kept.get("near"))
                else ""
            )
            + " (a later prep's --dedup-against reads them)"
            + (
                f"; also dropped: the texts of {', '.join(a['path'] for a in kept['against'])}"
                if kept["against"]
                else ""
            )
        )
    files = acc["files"]
    lines.append(
        f"files: {files['read']:,} read, "
        f"{sum(r['count'] for r in files['skipped'].values()):,} skipped, "
        f"{sum(r['count'] for r in files['ignored'].values()):,} ignored"
    )
    for kind in ("skipped", "ignored"):
        for reason, r in files[kind].items():
            lines.append(f"  {kind} {reason}: {r['count']:,} (first: {', '.join(r['examples'][:3])})")
    if (cut := files.get("cut_short")) and cut["count"]:
        lines.append(
            f"  cut short: {cut['count']:,}, read up to where each breaks off (first: {', '.join(cut['examples'][:3])})"
        )
    if seconds is not None:
        mb = acc["bytes_read"] / 1e6
        tokens = sum(s["tokens"] for s in man["splits"].values())
        lines.append(f"time: {seconds:.1f}s, {mb / seconds:.2f} MB/s, {tokens / seconds:,.0f} tokens/s")
    return "\n".join(lines)
