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

import prepare
from conftest import HERE
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
    got = sorted(enc.decode(d.tolist()) for part in (train, val) for d in np.split(part, np.where(part == EOT)[0] + 1) if len(d))
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
    prepare.main(["shakespeare_char", "--input", text, "--out_dir", str(tmp_path / "a"), "--val_fraction", "0.2"])
    prepare.main(["shakespeare_char", f"--input={text}", f"--out_dir={tmp_path / 'b'}", "--val_fraction=0.2"])
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# an address that refuses at once: the offline machine, without waiting for a real timeout
OFFLINE = "http://127.0.0.1:9"


@pytest.mark.parametrize("command", [
    ["-c", f"import sys, prepare, configurator; prepare.SHAKESPEARE_URL = '{OFFLINE}/input.txt'; "
     "configurator.cli(prepare.main, sys.argv[1:])",
     "shakespeare_char", "--out_dir=OUT"],
    ["prepare.py", "openwebtext", "--out_dir=OUT"],
    ["train.py", "--init_from=gpt2", "--data_dir=DATA", "--out_dir=OUT", "--device=cpu", "--block_size=64"],
    ["sample.py", "--init_from=gpt2", "--device=cpu"],
])
def test_offline_downloads_end_in_one_line_naming_the_local_way(command, tmp_path):
    env = dict(os.environ, HF_ENDPOINT=OFFLINE, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0")
    bpe = tmp_path / "bpe"  # GPT-2 weights need GPT-2 tokens (character data is refused before any download)
    prepare.prepare_shakespeare(str(bpe), input_path=_write(tmp_path / "t.txt", "To be, or not to be. " * 200))
    argv = [a.replace("OUT", str(tmp_path / "out")).replace("DATA", str(bpe)) for a in command]
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=HERE, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach"), proc.stderr
    assert ("--input=" if "prepare" in " ".join(command) else "--init_from=PATH") in lines[0]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)
