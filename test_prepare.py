"""
prepare.py: token files decode back to the text, for characters, GPT-2 BPE and a local HF dataset.

    python -m pytest -q test_prepare.py
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import prepare
from conftest import HERE, python_tree
from prepare import EOT, gpt2_encoding, load_tokenizer, read_meta


def read_ids(folder):
    return [np.fromfile(os.path.join(folder, f"{s}.bin"), dtype=np.uint16) for s in ("train", "val")]


def test_char_level_round_trip(char_data, shakespeare_text):
    train, val = read_ids(char_data)
    assert len(train) == int(len(shakespeare_text) * 0.9) and len(train) + len(val) == len(shakespeare_text)
    meta = read_meta(char_data)
    assert meta["vocab_size"] == 65 and meta["tokenizer"] == "char"
    encode, decode = load_tokenizer(meta)
    assert decode(np.concatenate([train, val]).tolist()) == shakespeare_text
    assert encode("ROMEO:") == [meta["stoi"][c] for c in "ROMEO:"]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        encode("ROMEO: ☃")
    with open(os.path.join(char_data, "meta.json")) as f:  # plain JSON, no pickle
        assert json.load(f) == meta


def test_gpt2_bpe_round_trip(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50
    prepare.prepare_shakespeare(str(tmp_path), input_path=_write(tmp_path / "in.txt", text))
    train, val = read_ids(tmp_path)
    enc = gpt2_encoding()
    assert np.concatenate([train, val]).tolist() == enc.encode_ordinary(text)
    assert enc.decode(np.concatenate([train, val]).tolist()) == text
    assert read_meta(str(tmp_path))["vocab_size"] == 50257


def test_hf_dataset_from_local_files(tmp_path):
    docs = [f"document number {i} says hello {'world ' * (i % 7)}" for i in range(300)]
    src = _write(tmp_path / "docs.txt", "\n".join(docs) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    prepare.prepare_hf(str(out), input_path=src, val_fraction=0.1, num_proc=2)
    train, val = read_ids(out)
    enc = gpt2_encoding()
    assert int((train == EOT).sum() + (val == EOT).sum()) == len(docs)  # one separator per document
    assert train[-1] == EOT and val[-1] == EOT
    got = sorted(
        enc.decode(d.tolist())
        for part in (train, val)
        for d in np.split(part, np.where(part == EOT)[0] + 1)
        if len(d)
    )
    assert got == sorted(d + "<|endoftext|>" for d in docs)


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match="usage"):
        prepare.main(["nope"])
    with pytest.raises(SystemExit, match="unknown option"):
        prepare.main(["shakespeare_char", "--inptu=x"])
    with pytest.raises(FileNotFoundError, match="is not a file"):
        prepare.main(["shakespeare_char", f"--input={tmp_path}/missing.txt", f"--out_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="is not a file"):  # `--input PATH` reads the same
        prepare.main(["shakespeare_char", "--input", f"{tmp_path}/missing.txt", "--out_dir", str(tmp_path)])


def test_space_separated_options_match_the_equals_form(tmp_path):
    text = _write(tmp_path / "in.txt", "to be or not to be, that is the question\n" * 50)
    prepare.main(
        ["shakespeare_char", "--input", text, "--out_dir", str(tmp_path / "a"), "--val_fraction", "0.2"]
    )
    prepare.main(["shakespeare_char", f"--input={text}", f"--out_dir={tmp_path / 'b'}", "--val_fraction=0.2"])
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# an address that refuses at once: the offline machine, without waiting for a real timeout
OFFLINE = "http://127.0.0.1:9"


@pytest.mark.parametrize(
    "command",
    [
        [
            "-c",
            f"import sys, prepare, configurator; prepare.SHAKESPEARE_URL = '{OFFLINE}/input.txt'; "
            "configurator.cli(prepare.main, sys.argv[1:])",
            "shakespeare_char",
            "--out_dir=OUT",
        ],
        ["prepare.py", "openwebtext", "--out_dir=OUT"],
        [
            "train.py",
            "--init_from=gpt2",
            "--data_dir=DATA",
            "--out_dir=OUT",
            "--device=cpu",
            "--block_size=64",
        ],
        ["sample.py", "--init_from=gpt2", "--device=cpu"],
    ],
)
def test_offline_downloads_end_in_one_line_naming_the_local_way(command, tmp_path):
    env = dict(os.environ, HF_ENDPOINT=OFFLINE, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0")
    bpe = tmp_path / "bpe"  # GPT-2 weights need GPT-2 tokens (character data is refused before any download)
    prepare.prepare_shakespeare(
        str(bpe), input_path=_write(tmp_path / "t.txt", "To be, or not to be. " * 200)
    )
    argv = [a.replace("OUT", str(tmp_path / "out")).replace("DATA", str(bpe)) for a in command]
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, env=env, cwd=HERE, timeout=120
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach"), proc.stderr
    assert ("--input=" if "prepare" in " ".join(command) else "--init_from=PATH") in lines[0]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# -----------------------------------------------------------------------------
# the bytes datasets of the method comparison (compare.py)


def documents(folder):
    train, val = (bytes(ids.astype(np.uint8)) for ids in read_ids(folder))
    return [d for d in train.split(b"\0") if d], [d for d in val.split(b"\0") if d]


def test_python_corpus_is_deterministic_and_split_by_whole_files(tmp_path):
    src = tmp_path / "lib"
    kept = python_tree(src, {f"mod{i}.py": f"def g{i}():\n    return {i}\n" for i in range(40)})
    prepare.prepare_python_stdlib(str(tmp_path / "a"), input_path=str(src))
    prepare.prepare_python_stdlib(str(tmp_path / "b"), input_path=str(src))
    for f in ("train.bin", "val.bin", "meta.json"):  # same bytes in, the same files out
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    train, val = documents(tmp_path / "a")
    want = {text.encode("utf-8") for text in kept.values()}
    assert set(train) | set(val) == want and len(train) + len(val) == len(
        want
    )  # every file once, no test file
    assert not set(train) & set(val) and train and val  # no file on both sides
    assert read_meta(str(tmp_path / "a"))["files"] == {"train": len(train), "val": len(val)}
    encode, decode = load_tokenizer(read_meta(str(tmp_path / "a")))
    assert decode(encode("café")) == "café" and len(encode("café")) == 5  # bytes, not characters
    # a file's side depends on its own path only: adding files moves none of the others
    python_tree(src, {"zzz_new.py": "NEW = 1\n"})
    prepare.prepare_python_stdlib(str(tmp_path / "c"), input_path=str(src))
    train_c, val_c = documents(tmp_path / "c")
    assert set(train) <= set(train_c) and set(val) <= set(val_c)


def test_shakespeare_bytes_round_trip(tmp_path, shakespeare_text):
    path = tmp_path / "in.txt"
    path.write_text(shakespeare_text, encoding="utf-8")
    prepare.prepare_shakespeare_bytes(str(tmp_path / "out"), input_path=str(path))
    train, val = read_ids(str(tmp_path / "out"))
    assert bytes(np.concatenate([train, val]).astype(np.uint8)).decode("utf-8") == shakespeare_text
    assert read_meta(str(tmp_path / "out"))["vocab_size"] == 256


def test_offline_hf_import_names_its_own_flag(tmp_path):
    """hf.py --import_from of an adapter whose base is the hub's gpt2, offline: one line that names
    hf.py's --base (not another script's flag)."""
    from safetensors.torch import save_file

    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "base_model_name_or_path": "gpt2",
                "r": 1,
                "lora_alpha": 1,
                "target_modules": ["lm_head"],
            }
        )
    )
    save_file(
        {
            "base_model.model.lm_head.lora_A.weight": torch.zeros(1, 4),
            "base_model.model.lm_head.lora_B.weight": torch.zeros(4, 1),
        },
        str(peft / "adapter_model.safetensors"),
    )
    env = dict(os.environ, HF_ENDPOINT=OFFLINE, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0")
    proc = subprocess.run(
        [sys.executable, "hf.py", f"--import_from={peft}", f"--out_dir={tmp_path / 'out'}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=HERE,
        timeout=120,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: cannot reach"), (
        proc.stderr
    )
    assert "hf.py: --base=PATH" in lines[0]


def test_prepare_finds_the_bundled_gpt2_ranks_by_itself(tmp_path):
    """`python prepare.py shakespeare` from another folder, TIKTOKEN_CACHE_DIR unset: it reads the ranks
    in testdata/tiktoken_cache (the README's step-by-step line works offline as written), and the ids
    are GPT-2's."""
    from conftest import SHAKESPEARE

    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_CACHE_DIR"}
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "prepare.py"),
            "shakespeare",
            f"--input={SHAKESPEARE}",
            "--out_dir=bpe",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    ids = np.fromfile(tmp_path / "bpe" / "train.bin", dtype=np.uint16)
    assert ids[:4].tolist() == [5962, 22307, 25, 198]  # "First Citizen:\n" in GPT-2's BPE
