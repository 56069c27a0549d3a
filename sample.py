"""
Text from a checkpoint (a base model or one with adapters) or from OpenAI's GPT-2.

    python sample.py --out_dir=out-shakespeare-lora                      # adapters applied unmerged
    python sample.py --out_dir=out-shakespeare-lora --merge=True         # merged into W first: plain model
    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out-shakespeare-char --start=FILE:prompt.txt --temperature=0.8 --top_k=50
    python sample.py --init_from=gpt2 --start="Hello, I'm a language model," --device=cpu
"""

import os
import sys

import torch

from adapters import merge_adapters
from checkpoint import CheckpointError, build_model, load_checkpoint
from configurator import ConfigError, check_device, check_ranges, cli, config_defaults, configure
from model import GPT, is_gpt2_folder
from prepare import load_tokenizer, read_meta

init_from = "resume"  # 'resume' (the checkpoint in out_dir), a gpt2 name, or a GPT-2 folder (config.json + model.safetensors)
out_dir = "out"  # an out_dir or a checkpoint file
start = "\n"  # the prompt, or FILE:path to read it from a file
num_samples = 2  # texts to generate
max_new_tokens = 500  # tokens per text
temperature = 0.8  # < 1 sharper, > 1 more random
top_k = 200  # keep the top_k most likely tokens; 0 keeps all
seed = 1337  # sampling seed
device = "cuda" if torch.cuda.is_available() else "cpu"  # 'cpu', 'cuda', 'cuda:N' or 'mps'
merge = False  # fold the adapters into the base weights before sampling
DEFAULTS = config_defaults(globals())


def sample(argv=(), environ=None):
    """Returns the list of generated texts (prompt included) and prints them."""
    c = configure(DEFAULTS, list(argv), environ)
    check_ranges(
        c,
        {
            "num_samples": "[1, inf)",
            "max_new_tokens": "[1, inf)",
            "temperature": "(0, inf)",
            "top_k": "[0, inf)",
        },
    )
    check_device(c["device"])
    if c["init_from"] == "resume":
        ckpt = load_checkpoint(c["out_dir"])
        model = build_model(ckpt)
        cfg = ckpt.get(
            "config", {}
        )  # the vocabulary the run trained on: its own copy, else its data folder's
        meta = ckpt.get("meta") or read_meta(
            cfg.get("data_dir") or os.path.join("data", cfg.get("dataset", ""))
        )
        if meta is None and ckpt["model_args"]["vocab_size"] < 50257:
            raise CheckpointError(
                f"the model has a {ckpt['model_args']['vocab_size']}-token vocabulary but "
                f"the dataset's meta.json ({cfg.get('dataset')!r}) is not in data/; prepare it"
            )
        del ckpt
    elif c["init_from"].startswith("gpt2") or is_gpt2_folder(c["init_from"]):
        model, meta = GPT.from_pretrained(c["init_from"]), None
    else:
        raise ConfigError(
            f"init_from must be 'resume', a gpt2 name or a GPT-2 folder (config.json + model.safetensors), "
            f"got {c['init_from']!r}"
        )
    if c["merge"]:
        model = merge_adapters(model)
    model.eval().to(c["device"])
    encode, decode = load_tokenizer(meta)

    prompt = c["start"]
    if prompt.startswith("FILE:"):
        with open(prompt[5:], encoding="utf-8") as f:
            prompt = f.read()
    ids = encode(prompt)
    if not ids:
        raise ConfigError("the prompt is empty after tokenisation; give --start")
    x = torch.tensor(ids, dtype=torch.long, device=c["device"])[None, ...]
    gen = torch.Generator(device=c["device"]).manual_seed(c["seed"])
    texts = []
    for _ in range(c["num_samples"]):
        y = model.generate(
            x, c["max_new_tokens"], temperature=c["temperature"], top_k=c["top_k"] or None, generator=gen
        )
        texts.append(decode(y[0].tolist()))
        print(texts[-1])
        print("---------------")
    return texts


if __name__ == "__main__":
    cli(sample, sys.argv[1:])
