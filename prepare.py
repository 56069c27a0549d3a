"""
Datasets to token files, nanoGPT-compatible: data/<name>/train.bin and val.bin (uint16 token ids)
and meta.json (vocabulary and tokenizer; JSON, not pickle).

    python prepare.py shakespeare_char                 # characters (65 symbols), downloads the text
    python prepare.py shakespeare                      # GPT-2 BPE through tiktoken
    python prepare.py openwebtext --num_proc=8         # Hugging Face datasets, tokenised in parallel
    python prepare.py shakespeare_char --input=PATH    # any local text file instead of the download
    python prepare.py python_stdlib                    # bytes: this Python's standard library source, no tests
    python prepare.py shakespeare_bytes --input=PATH   # bytes: Tiny Shakespeare in the same 256-symbol vocabulary
    python prepare.py openwebtext --input=DIR_OR_FILE  # local .txt / .json(l) / .parquet files
    options (--key=value or --key value):
      --input=PATH         a local text file (a folder or file of documents for openwebtext) instead of the download
      --out_dir=DIR        where train.bin, val.bin, meta.json go (default data/<name>)
      --val_fraction=F     the share of the stream kept for val (0.1; 0.0005 for openwebtext)
      --num_proc=N         openwebtext: tokenising processes (8)
      --overwrite=True     replace a different dataset already prepared in out_dir (refused otherwise)
      --vocab_from=DIR     shakespeare_char: the character ids of the dataset in DIR (to fine-tune a model trained on it)

tiktoken reads its ranks from TIKTOKEN_CACHE_DIR (default: this repo's testdata/tiktoken_cache): `gpt2`
is tried first, then `r50k_base`, which has the same ranks and <|endoftext|> id.
"""

import json
import os
import platform
import sys
import sysconfig
import zlib

import numpy as np
import torch

from files import DownloadError, atomic_write, download, reachable, read_json, read_text

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
EOT = 50256  # GPT-2's <|endoftext|>: separates documents


TIKTOKEN_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "tiktoken_cache")


def gpt2_encoding():
    """tiktoken's GPT-2 encoding. Its ranks ship in testdata/tiktoken_cache, read unless TIKTOKEN_CACHE_DIR
    names another cache: no download, online or off."""
    import tiktoken

    if os.path.isdir(TIKTOKEN_CACHE):
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", TIKTOKEN_CACHE)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:  # offline: gpt2's files cannot be fetched; r50k_base is the same encoding
        try:
            return tiktoken.get_encoding("r50k_base")
        except Exception as e:
            raise RuntimeError(
                "cannot load the GPT-2 tokenizer offline: point TIKTOKEN_CACHE_DIR at a folder holding "
                f"tiktoken's cached ranks, such as this repo's testdata/tiktoken_cache ({e})"
            ) from None


def load_tokenizer(meta):
    """(encode, decode) for a dataset's meta.json contents; None means GPT-2 BPE."""
    if meta and meta.get("tokenizer") == "bytes":  # UTF-8 bytes; a sample cut inside a character shows U+FFFD
        return (lambda s: list(s.encode("utf-8"))), (lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    if meta and meta.get("tokenizer") == "char":
        stoi, itos = meta["stoi"], {int(i): ch for i, ch in meta["itos"].items()}
        unknown = lambda s: sorted({c for c in s if c not in stoi})  # noqa: E731

        def encode(s):
            if unknown(s):
                raise ValueError(f"characters {unknown(s)} are not in the vocabulary of this dataset")
            return [stoi[c] for c in s]

        return encode, lambda ids: "".join(itos[i] for i in ids)
    enc = gpt2_encoding()
    return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})), enc.decode


def _bytes_to_unicode():
    """GPT-2's printable stand-in for each byte (its vocab.json and merges.txt spell tokens with them)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(b) if b in keep else chr(256 + extra.index(b)) for b in range(256)}


def write_hf_tokenizer(meta, folder, max_length):
    """The dataset's tokenizer as files transformers' AutoTokenizer reads from `folder`: GPT-2 BPE as
    vocab.json + merges.txt (rebuilt from tiktoken's ranks: each token's merge is the last step of BPE
    over its bytes with the ranks below its own), characters as a tokenizer.json that splits every
    character and maps it to its id. Bytes datasets get none (returns False)."""

    if meta and meta.get("tokenizer") == "bytes":
        return False
    if meta and meta.get("tokenizer") == "char":
        spec = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [],
            "normalizer": None,
            "pre_tokenizer": {
                "type": "Split",
                "pattern": {"Regex": r"[\s\S]"},
                "behavior": "Isolated",
                "invert": False,
            },
            "post_processor": None,
            "decoder": {"type": "Fuse"},
            # an unknown character is refused as by the repo's encoder: "<unk>" is in no character vocabulary
            "model": {"type": "WordLevel", "vocab": meta["stoi"], "unk_token": "<unk>"},
        }
        atomic_write(os.path.join(folder, "tokenizer.json"), json.dumps(spec, ensure_ascii=False))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": max_length,
            "clean_up_tokenization_spaces": False,
        }
    else:
        ranks, show = gpt2_encoding()._mergeable_ranks, _bytes_to_unicode()
        spell = lambda b: "".join(show[x] for x in b)  # noqa: E731
        merges = []
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            parts = [bytes([x]) for x in token]
            while len(parts) > 2:  # BPE with the merges ranked below this token: two parts are left
                i = min(range(len(parts) - 1), key=lambda k: ranks.get(parts[k] + parts[k + 1], rank))
                parts[i : i + 2] = [parts[i] + parts[i + 1]]
            if len(parts) == 2:
                merges.append(f"{spell(parts[0])} {spell(parts[1])}")
        vocab = {spell(token): rank for token, rank in ranks.items()} | {"<|endoftext|>": EOT}
        atomic_write(os.path.join(folder, "vocab.json"), json.dumps(vocab, ensure_ascii=False))
        atomic_write(os.path.join(folder, "merges.txt"), "#version: 0.2\n" + "\n".join(merges) + "\n")
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "model_max_length": max_length,
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "add_prefix_space": False,
        }
    atomic_write(os.path.join(folder, "tokenizer_config.json"), json.dumps(config, indent=1))
    return True


def read_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        return None
    return read_json(path)


class DataError(FileNotFoundError):
    """The data directory or its files are missing."""


def open_data(c):
    """(data folder, its meta.json or None, the token range [lo, hi) of train.bin to train on) for
    train.py's config c, checked before any model is built."""
    path = c["data_dir"] or os.path.join("data", c["dataset"])
    for f in ("train.bin", "val.bin"):
        if not os.path.isfile(os.path.join(path, f)):
            how = (
                f"run `python prepare.py {c['dataset']}`"
                if c["dataset"] in DATASETS
                else f"prepare it with prepare.py ({', '.join(DATASETS)}, or --input=FILE for your own text)"
            )
            raise DataError(f"data directory {path!r} has no {f}: {how}, or set --data_dir")
    for split in ("train", "val"):  # before any model is built: a block needs block_size + 1 tokens
        n = num_tokens(path, split)
        if n <= c["block_size"]:
            raise DataError(
                f"{path}/{split}.bin holds {n:,} tokens, not more than block_size {c['block_size']}: lower "
                "--block_size" + (" or prepare with a larger --val_fraction" if split == "val" else "")
            )
    meta = read_meta(path)
    lo, hi = data_range(meta, c["data_part"], num_tokens(path, "train"), path)
    if hi - lo <= c["block_size"]:
        raise DataError(f"{path}'s {c['data_part']} part holds {hi - lo:,} tokens, not more than block_size")
    # memmaps are reopened per batch (nanoGPT: avoids a slow memory leak of a long-lived memmap)
    return path, meta, [lo, hi]


def check_token_ids(data_dir, vocab_size):
    """For data without a meta.json (no vocabulary on record): every token id must fit the model's
    vocabulary, or one line says which file holds which id."""
    for split in ("train", "val"):
        top = int(np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r").max())
        if top >= vocab_size:
            raise DataError(
                f"{data_dir}/{split}.bin holds token id {top}, beyond the model's vocabulary of {vocab_size}: "
                "prepare the data with the model's tokenizer (prepare.py writes a meta.json saying which)"
            )


def get_batch(data_dir, split, ix, block_size, device, vocab_size):
    """The blocks starting at `ix` of split.bin and their next tokens; an id beyond the vocabulary (a
    file written with another tokenizer) is one line, not an index error deep in the model."""
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
    x = torch.stack([torch.from_numpy(data[i : i + block_size].astype(np.int64)) for i in ix.tolist()])
    y = torch.stack(
        [torch.from_numpy(data[i + 1 : i + 1 + block_size].astype(np.int64)) for i in ix.tolist()]
    )
    top = int(y.max().maximum(x.max()))
    if top >= vocab_size:
        raise DataError(
            f"{data_dir}/{split}.bin holds token id {top}, beyond the vocabulary of {vocab_size} (its meta.json's, "
            "else the model's): it was written with another tokenizer; prepare the data again"
        )
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def num_tokens(data_dir, split):
    return os.path.getsize(os.path.join(data_dir, f"{split}.bin")) // 2


def vocabulary(meta):
    """What a token id means: ('char', its characters in id order), ('gpt2',) or None if unknown."""
    if not meta:
        return None
    if meta.get("tokenizer") == "char":
        return (
            "char",
            "".join(
                meta["itos"][str(i)] if str(i) in meta["itos"] else meta["itos"][i]
                for i in range(meta["vocab_size"])
            ),
        )
    return (meta.get("tokenizer", "gpt2"),)


def check_vocabulary(base_meta, meta, source, data_dir):
    """A base trained on one vocabulary fine-tuned on data prepared with another would read every
    token id as another character: refused in one line."""
    have, want = vocabulary(base_meta), vocabulary(meta)
    if have is None or want is None or have == want:
        return
    if have[0] == want[0] == "char":
        extra = sorted(set(want[1]) - set(have[1]))
        detail = (
            f"characters the base never saw: {''.join(extra)!r}"
            if extra
            else "the same characters with other ids"
        )
        raise ValueError(
            f"the base {source!r} was trained on a {len(have[1])}-character vocabulary and {data_dir!r} uses "
            f"another ({len(want[1])} characters; {detail}): prepare the data with the base's vocabulary "
            f"(python prepare.py shakespeare_char --input=FILE --vocab_from=DIR_OF_THE_BASE_DATA)"
        )
    raise ValueError(
        f"the base {source!r} reads {have[0]} tokens but {data_dir!r} holds {want[0]} tokens: prepare the "
        "data with the base's tokenizer"
    )


def write_dataset(out_dir, ids, val_fraction, meta, overwrite=False):
    """First (1 - val_fraction) of the stream to train.bin, the rest to val.bin (as nanoGPT does), and
    meta.json (write_split)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val_fraction must be in (0, 1), got {val_fraction}")
    ids = np.asarray(ids, dtype=np.uint16)
    n = int(len(ids) * (1 - val_fraction))
    if min(n, len(ids) - n) < 2:
        raise ValueError(
            f"the input gives {len(ids):,} tokens: too few for a train and a val split of at least 2 "
            "tokens each; give a longer text (or another --val_fraction)"
        )
    write_split(out_dir, ids[:n], ids[n:], meta, overwrite)


def write_split(out_dir, train, val, meta, overwrite=False):
    """train.bin and val.bin (uint16 token id arrays) and meta.json. A prepared dataset already in
    out_dir is replaced only if it is the same or with `overwrite`; each file is written atomically."""
    files = {
        "train.bin": train.tobytes(),
        "val.bin": val.tobytes(),
        "meta.json": json.dumps(meta, indent=1).encode(),
    }
    differ = [
        f
        for f, data in files.items()
        if os.path.exists(os.path.join(out_dir, f)) and open(os.path.join(out_dir, f), "rb").read() != data
    ]
    if differ and not overwrite:
        raise ValueError(
            f"{out_dir} already holds another prepared dataset ({', '.join(differ)} differ): pass "
            "--overwrite=True to replace it, or --out_dir=ANOTHER_FOLDER"
        )
    os.makedirs(out_dir, exist_ok=True)
    for f, data in files.items():
        atomic_write(os.path.join(out_dir, f), data)
    print(
        f"train.bin: {len(files['train.bin']) // 2:,} tokens\nval.bin: {len(files['val.bin']) // 2:,} tokens"
    )


def refuse_to_replace(out_dir, overwrite):
    """For datasets too large to compare before writing: refuse an out_dir that holds one already."""
    held = [f for f in ("train.bin", "val.bin", "meta.json") if os.path.exists(os.path.join(out_dir, f))]
    if held and not overwrite:
        raise ValueError(
            f"{out_dir} already holds a prepared dataset ({', '.join(held)}): pass --overwrite=True to "
            "replace it, or --out_dir=ANOTHER_FOLDER"
        )


def read_shakespeare(input_path, out_dir):
    """The local file if given; else out_dir/input.txt, downloaded once."""
    if input_path:
        if not os.path.isfile(input_path):
            raise FileNotFoundError(f"--input {input_path!r} is not a file")
        path = input_path
    else:
        path = os.path.join(out_dir, "input.txt")
        if not os.path.exists(path):
            download(SHAKESPEARE_URL, path, "pass a local copy of Tiny Shakespeare with --input=PATH")
    return read_text(path)


def prepare_shakespeare_char(out_dir, input_path=None, val_fraction=0.1, overwrite=False, vocab_from=None):
    """Characters as tokens: the text's own sorted characters, or (vocab_from) the vocabulary of another
    prepared dataset, so a model trained on that one reads this one with the same ids."""
    text = read_shakespeare(input_path, out_dir)
    if vocab_from:
        base = read_meta(vocab_from)
        if not base or base.get("tokenizer") != "char":
            raise ValueError(
                f"--vocab_from={vocab_from} holds no character meta.json (prepare that dataset first)"
            )
        chars = [base["itos"][str(i)] for i in range(base["vocab_size"])]
        unseen = sorted(set(text) - set(chars))
        if unseen:
            raise ValueError(
                f"the input has {len(unseen)} character(s) outside the vocabulary of {vocab_from}: "
                f"{''.join(unseen)!r}; remove them from the text or prepare without --vocab_from"
            )
    else:
        chars = sorted(set(text))
    if len(chars) > 65536:
        raise ValueError(
            f"the input has {len(chars):,} distinct characters, more than the 65,536 ids a uint16 token "
            "file holds: prepare it as bytes (shakespeare_bytes) or GPT-2 BPE (shakespeare)"
        )
    stoi = {ch: i for i, ch in enumerate(chars)}
    print(f"{len(text):,} characters, vocabulary of {len(chars)}")
    write_dataset(
        out_dir,
        [stoi[c] for c in text],
        val_fraction,
        {
            "tokenizer": "char",
            "vocab_size": len(chars),
            "stoi": stoi,
            "itos": {str(i): ch for i, ch in enumerate(chars)},
        },
        overwrite,
    )


def prepare_shakespeare(out_dir, input_path=None, val_fraction=0.1, overwrite=False):
    text = read_shakespeare(input_path, out_dir)
    ids = gpt2_encoding().encode_ordinary(text)
    print(f"{len(text):,} characters, {len(ids):,} GPT-2 tokens")
    write_dataset(
        out_dir, ids, val_fraction, {"tokenizer": "gpt2", "vocab_size": 50257, "eot": EOT}, overwrite
    )


BYTES = {
    "tokenizer": "bytes",
    "vocab_size": 256,
}  # every text in one vocabulary: a model of one reads another


def prepare_shakespeare_bytes(out_dir, input_path=None, val_fraction=0.1, overwrite=False):
    """Tiny Shakespeare as UTF-8 bytes, nanoGPT's split (the last val_fraction of the text); its
    documents (for eval_bounds) are the speeches, separated by a blank line."""
    data = read_shakespeare(input_path, out_dir).encode("utf-8")
    print(f"{len(data):,} bytes")
    write_dataset(out_dir, list(data), val_fraction, dict(BYTES, separator=list(b"\n\n")), overwrite)


# the standard library without its tests: folders whose name starts with 'test' (test, tests, idle_test...)
# and test_*.py files are left out, as are installed packages and caches
STDLIB_SKIP = ("site-packages", "dist-packages", "__pycache__")


def python_files(root):
    """The .py files below root that are not tests, as sorted '/'-separated relative paths."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_SKIP and not d.startswith("test")]
        rel = os.path.relpath(folder, root).replace(os.sep, "/")
        found += [
            f if rel == "." else f"{rel}/{f}"
            for f in files
            if f.endswith(".py") and not f.startswith("test_")
        ]
    return sorted(found)


def in_val(rel_path, val_fraction):
    """A file's split from its path alone (CRC-32), so adding or removing other files moves no file."""
    return zlib.crc32(rel_path.encode("utf-8")) % 10_000 < val_fraction * 10_000


def prepare_python_stdlib(out_dir, input_path=None, val_fraction=0.1, overwrite=False):
    """The source of Python's standard library (or of any folder, --input=DIR) as UTF-8 bytes: a
    genuine shift from Shakespeare in the same 256-symbol vocabulary. Each file is one document,
    followed by a NUL byte (which Python source never holds); a file goes to val when the CRC-32 of
    its relative path says so, so no file is split across train and val, and the split is fixed."""
    root = input_path or sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--input {root!r} is not a folder of .py files")
    files = python_files(root)
    if not files:
        raise ValueError(f"{root} holds no .py files outside tests")
    split = {"train": bytearray(), "val": bytearray()}
    counts = {"train": 0, "val": 0}
    for rel in files:
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        if b"\0" in data:
            raise ValueError(f"{rel} holds a NUL byte, the document separator; remove the file from --input")
        part = "val" if in_val(rel, val_fraction) else "train"
        split[part] += data + b"\0"
        counts[part] += 1
    if not counts["val"] or not counts["train"]:
        raise ValueError(
            f"{len(files)} file(s) in {root}: too few for a train and a val split by file; give more files"
        )
    print(
        f"{len(files):,} files of {root} ({sum(map(len, split.values())):,} bytes): {counts['train']:,} train, "
        f"{counts['val']:,} val"
    )
    meta = dict(
        BYTES, separator=[0], files=counts, **({} if input_path else {"python": platform.python_version()})
    )
    ids = {k: np.frombuffer(bytes(v), dtype=np.uint8).astype(np.uint16) for k, v in split.items()}
    write_split(out_dir, ids["train"], ids["val"], meta, overwrite)


def prepare_hf(
    out_dir,
    input_path=None,
    val_fraction=0.0005,
    num_proc=8,
    name="Skylion007/openwebtext",
    revision="refs/convert/parquet",
    overwrite=False,
):
    """A Hugging Face text dataset, one document per row: BPE in parallel, <|endoftext|> after each
    document, written to a memmap in shards with a progress bar (nanoGPT's openwebtext/prepare.py)."""
    from datasets import load_dataset
    from tqdm import tqdm

    refuse_to_replace(out_dir, overwrite)

    if input_path:  # local files: a .txt holds one document per line
        files = (
            [os.path.join(input_path, f) for f in sorted(os.listdir(input_path))]
            if os.path.isdir(input_path)
            else [input_path]
        )
        if not files:
            raise FileNotFoundError(f"--input {input_path!r} holds no files")
        ext = os.path.splitext(files[0])[1].lstrip(".")
        builder = {"txt": "text", "jsonl": "json"}.get(ext, ext)
        ds = load_dataset(builder, data_files=files, split="train")
    else:  # datasets >= 4 runs no loading scripts: read the hub's parquet conversion of OpenWebText
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE or not reachable(constants.ENDPOINT):
            raise DownloadError(
                f"cannot reach {constants.ENDPOINT} to download {name} (offline?): fetch it on a "
                "connected machine and pass --input=DIR holding its .parquet / .jsonl / .txt files"
            )
        ds = load_dataset(name, split="train", num_proc=num_proc, revision=revision)
    split = ds.train_test_split(test_size=val_fraction, seed=2357, shuffle=True)
    enc = gpt2_encoding()

    def tokenize(example):
        ids = enc.encode_ordinary(example["text"]) + [EOT]
        return {"ids": ids, "len": len(ids)}

    for split_name, dset in (("train", split["train"]), ("val", split["test"])):
        tok = dset.map(
            tokenize,
            remove_columns=dset.column_names,
            desc=f"tokenizing {split_name}",
            num_proc=min(num_proc, max(1, len(dset) // 64)),
        )
        total = int(np.sum(tok["len"], dtype=np.uint64))
        path = os.path.join(out_dir, f"{split_name}.bin")

        def write(tmp, tok=tok, total=total, path=path):
            arr, shards, idx = (
                np.memmap(tmp, dtype=np.uint16, mode="w+", shape=(total,)),
                min(1024, len(tok)),
                0,
            )
            for i in tqdm(range(shards), desc=f"writing {path}", disable=None):  # no bar in a log file
                batch = tok.shard(num_shards=shards, index=i, contiguous=True).with_format("numpy")
                ids = np.concatenate(batch["ids"]) if len(batch) else np.zeros(0, np.uint16)
                arr[idx : idx + len(ids)] = ids
                idx += len(ids)
            arr.flush()

        atomic_write(path, write)
        print(f"{split_name}.bin: {total:,} tokens in {len(tok):,} documents")
    atomic_write(
        os.path.join(out_dir, "meta.json"),
        json.dumps({"tokenizer": "gpt2", "vocab_size": 50257, "eot": EOT}, indent=1),
    )


def separator(meta):
    """The token ids between two documents of a dataset: its meta.json's own (bytes datasets name theirs:
    NUL between files), a blank line for characters, else GPT-2's <|endoftext|>."""
    if meta and meta.get("separator"):
        return meta["separator"]
    if meta and meta.get("tokenizer") == "char":
        return load_tokenizer(meta)[0]("\n\n")
    return [EOT]


def documents(train, sep):
    """(start, end) of every document of a token array: the spans between `sep` token sequences."""
    sep = np.asarray(sep, dtype=train.dtype)
    hits = np.flatnonzero(
        np.all([train[i : len(train) - len(sep) + 1 + i] == t for i, t in enumerate(sep)], axis=0)
    )
    starts = np.concatenate([[0], hits + len(sep)])
    ends = np.concatenate([hits, [len(train)]])
    keep = ends - starts >= 2  # a document needs a token and a next token
    return starts[keep], ends[keep]


def split_parts(out_dir, prior_fraction):
    """Split a prepared dataset's training tokens into a prior part (the first documents, about
    `prior_fraction` of the tokens) and a bound part (the rest), at a document boundary, recorded in
    meta.json as parts = {"prior": [0, a], "bound": [a, n]}: a model pretrained on the prior part has
    provably never seen the bound part, so it can be a bound's prior (train.py --data_part)."""
    if not 0 < prior_fraction < 1:
        raise ValueError(f"--prior_fraction must be in (0, 1), got {prior_fraction}")
    meta = read_meta(out_dir) or {"tokenizer": "gpt2", "vocab_size": 50257, "eot": EOT}
    train = np.memmap(os.path.join(out_dir, "train.bin"), dtype=np.uint16, mode="r")
    starts, _ = documents(np.asarray(train), separator(meta))
    later = starts[starts >= prior_fraction * len(train)]
    if not len(later) or later[0] < 2:
        raise ValueError(
            f"{out_dir}/train.bin has no document boundary after {prior_fraction:.0%} of its tokens: choose "
            "another --prior_fraction"
        )
    a = int(later[0])
    meta["parts"] = {"prior": [0, a], "bound": [a, len(train)]}
    atomic_write(os.path.join(out_dir, "meta.json"), json.dumps(meta, indent=1))
    print(f"parts: prior tokens [0, {a:,}), bound tokens [{a:,}, {len(train):,}) (a document boundary)")


def data_range(meta, part, n, data_dir):
    """The token range [lo, hi) of train.bin that `part` ('' = all of it, 'prior' or 'bound') names."""
    if not part:
        return [0, n]
    parts = (meta or {}).get("parts", {})
    if part not in parts:
        raise ValueError(
            f"data_part={part!r} but {data_dir}/meta.json records no parts: split the data first (python "
            "prepare.py DATASET --prior_fraction=0.5)"
        )
    return list(parts[part])


DATASETS = {
    "shakespeare_char": prepare_shakespeare_char,
    "shakespeare": prepare_shakespeare,
    "openwebtext": prepare_hf,
    "shakespeare_bytes": prepare_shakespeare_bytes,
    "python_stdlib": prepare_python_stdlib,
}


OPTIONS = ("input", "out_dir", "val_fraction", "num_proc", "overwrite", "vocab_from", "prior_fraction")
USAGE = (
    "usage: python prepare.py {" + "|".join(DATASETS) + "} [--input=PATH] [--out_dir=DIR] [--val_fraction=F] "
    "[--num_proc=N] [--overwrite=True] [--vocab_from=DIR (characters)] [--prior_fraction=F]"
)


def main(argv):
    if "--help" in argv or "-h" in argv:
        print(USAGE + "\n\n" + __doc__.strip())
        raise SystemExit(0)
    if not argv or argv[0] not in DATASETS:
        raise SystemExit(USAGE)
    name, opts, args = argv[0], {}, list(argv[1:])
    while args:
        arg = args.pop(0)
        key, eq, value = arg.removeprefix("--").partition("=")
        if arg.startswith("--") and not eq and key in OPTIONS and args and not args[0].startswith("--"):
            value, eq = args.pop(0), "="  # `--input PATH`, the other common spelling
        if not arg.startswith("--") or not eq or key not in OPTIONS:
            raise SystemExit(f"error: unknown option {arg!r}; " + USAGE.removeprefix("usage: "))
        opts[key] = value
    out_dir = opts.pop("out_dir", os.path.join("data", name))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out_dir {out_dir!r} is a file; choose a folder")
    kwargs = {
        "input_path": opts.get("input"),
        "overwrite": opts.get("overwrite", "False").lower() in ("1", "true"),
    }
    if "val_fraction" in opts:
        try:
            kwargs["val_fraction"] = float(opts["val_fraction"])
        except ValueError:
            raise ValueError(
                f"--val_fraction must be a number in (0, 1), got {opts['val_fraction']!r}"
            ) from None
    for key, only in (("num_proc", "openwebtext"), ("vocab_from", "shakespeare_char")):
        if key in opts and name != only:
            raise ValueError(f"--{key} applies to {only} only")
    if "num_proc" in opts:
        if not opts["num_proc"].isdigit() or int(opts["num_proc"]) < 1:
            raise ValueError(f"--num_proc must be a whole number >= 1, got {opts['num_proc']!r}")
        kwargs["num_proc"] = int(opts["num_proc"])
    if "vocab_from" in opts:
        kwargs["vocab_from"] = opts["vocab_from"]
    prior = opts.get("prior_fraction")
    try:
        prior = None if prior is None else float(prior)
    except ValueError:
        raise ValueError(f"--prior_fraction must be a number in (0, 1), got {prior!r}") from None
    if prior is not None and not 0 < prior < 1:
        raise ValueError(f"--prior_fraction must be in (0, 1), got {prior}")
    os.makedirs(out_dir, exist_ok=True)
    DATASETS[name](out_dir, **kwargs)
    if prior is not None:
        split_parts(out_dir, prior)
    print(f"wrote {out_dir}/train.bin, val.bin, meta.json")


if __name__ == "__main__":
    from configurator import cli

    cli(main, sys.argv[1:])
