"""
Text from a checkpoint (a base model or one with adapters) or from OpenAI's GPT-2. Keys and values are
cached: the prompt is prefilled once, then each new token costs one position (--kv_cache=False
recomputes the whole context every step, as nanoGPT does). The context is the last block_size tokens:
past block_size every step recomputes them (the window slides, so nothing cached stays valid), and
both paths give the same text.

    python sample.py --out_dir=out-shakespeare-lora                      # adapters applied unmerged
    python sample.py --out_dir=out-shakespeare-lora --merge=True         # merged into W first: plain model
    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out-shakespeare-char --start=FILE:prompt.txt --temperature=0.8 --top_k=50
    python sample.py --out_dir=out-shakespeare-char --prompts=prompts.txt --stop="\n\n"   # a batch, one per line
    python sample.py --init_from=gpt2 --start="Hello, I'm a language model," --stop="<|endoftext|>" --device=cpu
"""

import os
import sys

import torch

from adapters import merge_adapters
from checkpoint import CheckpointError, build_model, load_checkpoint
from configurator import ConfigError, check_device, check_ranges, cli, config_defaults, configure
from model import GPT, KVCache, is_gpt2_folder
from prepare import load_tokenizer, read_meta

init_from = "resume"  # 'resume' (the checkpoint in out_dir), a gpt2 name, or a GPT-2 folder (config.json + model.safetensors)
out_dir = "out"  # an out_dir or a checkpoint file
start = "\n"  # the prompt, or FILE:path to read it (the whole file) from a file
prompts = ""  # a file of prompts, one per line (instead of start): generated together, left-padded
num_samples = 2  # texts per prompt
max_new_tokens = 500  # tokens per text, at most
stop = ""  # end a text where this string appears (kept out of it); e.g. '<|endoftext|>' for GPT-2
temperature = 0.8  # < 1 sharper, > 1 more random; 0: always the most likely token (greedy)
top_k = 200  # keep the top_k most likely tokens; 0 keeps all
seed = 1337  # text k (over prompts, then samples) samples with seed + k: the same text alone or in a batch
batch_size = 0  # texts generated together; 0 = all of them. A batch of one streams its tokens as they come
kv_cache = True  # cache keys and values (False: recompute the whole context for every token)
device = "cuda" if torch.cuda.is_available() else "cpu"  # 'cpu', 'cuda', 'cuda:N' or 'mps'
merge = False  # fold the adapters into the base weights before sampling
plugins = ""  # modules imported first (names or .py paths): the families a run was trained with
DEFAULTS = config_defaults(globals())


def load(c):
    """(model, meta) of the checkpoint or GPT-2 that init_from names."""
    if c["init_from"] == "resume":
        ckpt = load_checkpoint(c["out_dir"])
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
        vocab = ckpt["model_args"]["vocab_size"]
        if meta and (
            meta["vocab_size"] > vocab or meta.get("tokenizer") != "gpt2" and meta["vocab_size"] != vocab
        ):
            where = (
                "the checkpoint's" if ckpt.get("meta") else f"{cfg.get('data_dir') or cfg.get('dataset')!r}'s"
            )
            raise CheckpointError(
                f"the model reads {vocab} token ids but {where} vocabulary has {meta['vocab_size']} (the data was "
                "prepared again with other text since?): prepare the data the run trained on, or train again"
            )
        return build_model(ckpt), meta
    if c["init_from"].startswith("gpt2") or is_gpt2_folder(c["init_from"]):
        return GPT.from_pretrained(c["init_from"]), None
    raise ConfigError(
        f"init_from must be 'resume', a gpt2 name or a GPT-2 folder (config.json + model.safetensors), "
        f"got {c['init_from']!r}"
    )


def read_prompts(c, encode, context):
    """The token ids of every prompt, each checked: not empty, shorter than the model's context."""
    if c["prompts"]:
        with open(c["prompts"], encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
        if not texts:
            raise ConfigError(f"--prompts={c['prompts']} holds no prompt: write one per line")
    elif c["start"].startswith("FILE:"):
        with open(c["start"][5:], encoding="utf-8") as f:
            texts = [f.read()]
    else:
        texts = [c["start"]]
    ids = [encode(text) for text in texts]
    for text, tokens in zip(texts, ids):
        if not tokens:
            raise ConfigError(f"the prompt {text!r} is empty after tokenisation; give --start or --prompts")
        if len(tokens) >= context:
            raise ConfigError(
                f"a prompt of {len(tokens)} tokens ({text[:40]!r}...) leaves no room in the model's context of "
                f"{context}: shorten it below {context} tokens"
            )
    return ids


def check_stop(c, encode, decode):
    """The stop string, which the tokenizer must be able to write."""
    if not c["stop"]:
        return None
    stop = c["stop"].encode().decode("unicode_escape")  # '\n' on a command line means a newline
    try:
        written = decode(encode(stop))
    except ValueError as e:
        raise ConfigError(f"--stop={c['stop']!r} cannot be encoded by this model's tokenizer: {e}") from None
    if written != stop:
        raise ConfigError(f"--stop={c['stop']!r} comes back as {written!r} from this model's tokenizer")
    return stop


def check_memory(model, c, rows):
    """Refuse, before any generation, a batch whose cache and logits do not fit the device's free memory."""
    dtype = next(model.parameters()).dtype
    need = KVCache.nbytes(model.config, rows, model.config.block_size, dtype)
    need += 2 * rows * model.config.vocab_size * torch.finfo(dtype).bits // 8
    if c["device"].startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(c["device"]))[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > free:
        raise ConfigError(
            f"a batch of {rows} texts needs {need / 2**20:,.0f} MB for its cache and logits, {free / 2**20:,.0f} MB "
            f"are free on {c['device']}: lower --batch_size"
        )


def generate_batch(model, c, prompt_ids, seeds, decode, stop):
    """Generate one batch of texts (left-padded prompts, one generator per text), each cut at `stop`."""
    longest = max(len(ids) for ids in prompt_ids)
    pads = torch.tensor([longest - len(ids) for ids in prompt_ids], device=c["device"])
    x = torch.tensor([[0] * (longest - len(ids)) + ids for ids in prompt_ids], device=c["device"])
    gens = [torch.Generator(device=c["device"]).manual_seed(s) for s in seeds]
    new, done, shown = [[] for _ in prompt_ids], [False] * len(prompt_ids), 0
    streaming, top_k = len(prompt_ids) == 1, c["top_k"] or None
    if streaming:  # one text: shown as it comes
        print(decode(prompt_ids[0]), end="", flush=True)
    for token, _ in model.stream(x, c["max_new_tokens"], c["temperature"], top_k, gens, c["kv_cache"], pads):
        for row, t in enumerate(token.tolist()):
            if not done[row]:
                new[row].append(t)
                done[row] = stop is not None and stop in decode(new[row])
        if streaming:  # held back: a character still being spelled by its bytes, and what may start `stop`
            text = cut(decode(new[0]), stop)
            ready = len(text.rstrip("\ufffd")) - (0 if done[0] or not stop else len(stop) - 1)
            print(text[shown:ready], end="", flush=True)
            shown = max(shown, ready)
        if all(done):
            break
    if streaming:
        print(cut(decode(new[0]), stop)[shown:])
    return [cut(decode(ids), stop) for ids in new]


def cut(text, stop):
    """The text before the first `stop` (all of it without one)."""
    return text.split(stop)[0] if stop else text


def sample(argv=(), environ=None):
    """Returns the list of generated texts (prompt included) and prints them."""
    c = configure(DEFAULTS, list(argv), environ)
    ranges = {"num_samples": "[1, inf)", "max_new_tokens": "[1, inf)", "temperature": "[0, inf)"}
    check_ranges(c, dict(ranges, top_k="[0, inf)", batch_size="[0, inf)"))
    check_device(c["device"])
    model, meta = load(c)
    if c["merge"]:
        model = merge_adapters(model)
    model.eval().to(c["device"])
    encode, decode = load_tokenizer(meta)
    prompt_ids = read_prompts(c, encode, model.config.block_size)
    stop = check_stop(c, encode, decode)
    jobs = [
        (ids, c["seed"] + k) for k, ids in enumerate(i for i in prompt_ids for _ in range(c["num_samples"]))
    ]
    size = c["batch_size"] or len(jobs)
    check_memory(model, c, min(size, len(jobs)))
    texts = []
    for b in range(0, len(jobs), size):
        batch = jobs[b : b + size]
        for (ids, _), text in zip(batch, generate_batch(model, c, *zip(*batch), decode, stop)):
            texts.append(decode(ids) + text)
            if len(batch) > 1:  # a batch of one was streamed
                print(texts[-1])
            print("---------------")
    return texts


if __name__ == "__main__":
    cli(sample, sys.argv[1:])
