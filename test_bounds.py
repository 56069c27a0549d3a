"""
eval_bounds.py: the arithmetic coder, quantisation, the bound formulas, and a non-vacuous bound end
to end on Tiny Shakespeare.

    python -m pytest -q test_bounds.py
"""

import hashlib
import json
import math
import os
import random

import numpy as np
import pytest
import torch

import checkpoint
import eval_bounds as eb
import train
from checkpoint import load_checkpoint
from configurator import ConfigError
from conftest import case_run_keys, run_args
from model import GPT, GPTConfig


@pytest.mark.parametrize("probs", [[0.25] * 4, [0.9, 0.05, 0.03, 0.01, 0.01], [0.5, 0.5], [1.0]])
def test_arithmetic_coder_round_trip_and_length(probs):
    rng = random.Random(0)
    d = 20_000
    symbols = rng.choices(range(len(probs)), weights=probs, k=d)
    counts = [symbols.count(k) for k in range(len(probs))]
    bits = eb.arithmetic_encode(symbols, counts)
    assert eb.arithmetic_decode(bits, counts, d) == symbols
    entropy = -sum(c * math.log2(c / d) for c in counts if c)  # d · H(p̂)
    assert entropy - 1e-9 <= len(bits) <= entropy + 2 + 1e-3 * entropy


def test_arithmetic_coder_short_streams():
    for n in range(1, 30):
        symbols = [random.Random(n).randrange(3) for _ in range(n)]
        counts = [symbols.count(k) for k in range(3)]
        assert eb.arithmetic_decode(eb.arithmetic_encode(symbols, counts), counts, n) == symbols


def test_quantization_levels():
    torch.manual_seed(0)
    w = torch.randn(500) * 0.1
    lengths = []
    for n_levels in (3, 11, 51, 2**16):
        centroids, symbols = eb.quantize(w, n_levels, "bins")
        assert len(centroids) == n_levels and int(symbols.max()) < n_levels
        err = (centroids[symbols] - w.double()).abs().max()
        # the nearest centroid is no farther than its own bin's mean: one bin width, 2 max|w| / levels
        # (up to the fp16 rounding of the transmitted centroids)
        assert err <= 2 * float(w.abs().max()) / n_levels + 1e-3 * float(w.abs().max())
        lengths.append(eb.message_length([(symbols.tolist(), n_levels)])["total_bits"])
    assert lengths == sorted(lengths) and lengths[0] < lengths[1]  # more levels, longer message
    centroids, symbols = eb.quantize(w, 2**16, "bins")
    assert (centroids[symbols] - w.double()).abs().max() < 2e-4  # fp16 centroids: ~1e-4 relative


def test_kmeans_quantisation_beats_equal_width_bins_on_heavy_tails():
    """Equal-width bins over ±max|w| waste levels on the tails of a heavy-tailed w; Lloyd's centroids
    (from the quantiles) give a lower squared error with the same count, and Lloyd never increases it."""
    w = torch.from_numpy(np.random.default_rng(0).standard_t(2.0, 20_000))
    err = {}
    for init in ("bins", "quantile", "kmeans"):
        centroids, symbols = eb.quantize(w, 11, init)
        assert torch.equal(
            symbols, (w.double()[:, None] - centroids[None, :]).abs().argmin(1)
        )  # nearest centroid
        err[init] = float(((centroids[symbols] - w.double()) ** 2).mean())
    assert err["kmeans"] <= err["quantile"] + 1e-12 and err["kmeans"] < 0.5 * err["bins"]


def test_elias_delta_is_a_prefix_free_length():
    assert [eb.elias_delta_bits(n) for n in (1, 2, 3, 4, 7, 8, 15, 16, 17)] == [1, 4, 4, 5, 5, 8, 8, 9, 9]
    kraft = sum(2.0 ** -eb.elias_delta_bits(n) for n in range(1, 2**16))
    assert kraft <= 1.0
    assert (
        sum(2.0 ** -(2 * math.log2(n)) for n in range(1, 2**16)) > 1.6
    )  # L + 2 log₂ L: π²/6 > 1, not a code


def test_message_length_parts():
    symbols = [0] * 90 + [1] * 10
    msg = eb.message_length([(symbols, 3), ([0, 1, 1, 0], 2)], extra_bits=5)
    # per group: 16 bits per level, ⌈log₂(d + 1)⌉ per count but the last (d implies it): 2·7 + 1·3
    assert (
        msg["codebook_bits"] == 48 + 32 and msg["count_bits"] == 14 + 3 and msg["sent_raw"] == [False, False]
    )
    alone = [eb.message_length([g])["code_bits"] for g in [(symbols, 3), ([0, 1, 1, 0], 2)]]
    assert msg["code_bits"] == sum(alone)  # each group under its own counts
    L = 2 + msg["code_bits"] + 80 + 17  # one bit per group says coded or raw
    assert msg["L_bits"] == L and msg["total_bits"] == L + eb.elias_delta_bits(L) + 5


def test_a_small_group_is_sent_raw_when_that_is_shorter(tmp_path):
    """SubLoRA's 5 gate logits at 11 levels: a codebook of 176 bits against 80 bits of fp16 values. The
    group goes raw, the decoder then holds the fp16 values themselves, and the message is shorter."""
    state = {"w": torch.randn(3000, dtype=torch.float64), "gates": torch.tensor([0.3, -1.2, 2.5, 0.0, 0.71])}
    groups = eb.message_groups(state)
    coded = eb.quantize_message(state, groups, 11, "kmeans")
    msg = eb.message_length([(symbols.tolist(), 11) for _, symbols in coded.values()])
    assert msg["sent_raw"] == [False, True] and msg["fp16_bits"] == 80
    gate_codes = coded["gates"][1].tolist()
    coded_cost = (
        len(eb.arithmetic_encode(gate_codes, [gate_codes.count(k) for k in range(11)])) + 11 * 16 + 10 * 3
    )
    assert coded_cost > 80
    rebuilt = eb.dequantize(state, groups, eb.send_raw(state, groups, coded, msg["sent_raw"]))
    assert torch.equal(rebuilt["gates"], state["gates"].half().double())
    centroids, symbols = coded["w"]
    assert torch.equal(rebuilt["w"], centroids[symbols])


def test_sampling_term_pays_for_the_hypotheses_chosen_by_the_samples():
    # M = 8 α values × 30 runs chose by the sampled blocks: ln(240 / ((1 - r) ε)) under the sampling root
    r = 1000 / (10**6 + 1000)
    expected = (
        2
        + 3 * math.sqrt((1000 * math.log(2) + math.log(1 / (r * 0.05))) / 2e6)
        + 3 * math.sqrt(math.log(240 / ((1 - r) * 0.05)) / 2000)
    )
    assert eb.bound(2.0, 3.0, 1000, 10**6, 1000, 0.05, candidates=240).value == pytest.approx(
        expected, rel=1e-12
    )
    assert (
        expected - eb.bound(2.0, 3.0, 1000, 10**6, 1000, 0.05).value > 0.07
    )  # the bound without the union: too low
    # every point scored (s = None): no sampling term, the whole ε on the complexity term
    assert eb.bound(2.0, 3.0, 1000, 10**6, None, 0.05).value == pytest.approx(
        2 + 3 * math.sqrt((1000 * math.log(2) + math.log(20)) / 2e6), rel=1e-12
    )


def test_top_k_error_counts_ties_against_the_true_token():
    class Uniform(torch.nn.Module):
        def forward(self, x, y):
            return torch.zeros(*x.shape, 65), None

    x = torch.randint(65, (2, 16))
    y = torch.randint(65, (2, 16))
    _, _, errors, _ = eb.per_token_stats(Uniform(), x, y, [0.1], [1, 10, 64], 65)
    assert errors.mean(dim=(0, 1)).tolist() == [1.0, 1.0, 1.0]  # a uniform guess is never in any top k < V


def test_every_document_token_is_scored_from_the_separator():
    class Next(torch.nn.Module):  # predicts token x + 1 with certainty
        def forward(self, x, y):
            return torch.nn.functional.one_hot((x + 1) % 16, 16).float() * 50, None

    train_ids = np.array([5, 6, 7, 0, 0, 3, 4, 0, 0, 8, 9], dtype=np.uint16)
    starts, ends = eb.documents(train_ids, [0, 0])
    _, err = eb.doc_level(
        Next(), train_ids, starts, ends, 8, [0.1], [1], 16, dict(batch_size=4, device="cpu")
    )
    # [5,6,7]: 6, 7 right (the corpus' first token has no context); [3,4]: 3 from the separator's 0 is
    # wrong, 4 right; [8,9]: 8 wrong, 9 right
    assert err == pytest.approx([(0 + 0.5 + 0.5) / 3])


def test_token_level_bound_by_hand():
    # R̂ = 2, Δ = 3, K = 1000 bits, N = 10^6 tokens, s = 1000 blocks, ε = 0.05: r = 1000 / 1001000
    # complexity: 3 √((1000 · 0.693147 + ln(1 / (0.000999 · 0.05))) / 2e6) = 3 √((693.147 + 9.9035) / 2e6)
    # subsampling: 3 √(ln(1 / (0.999001 · 0.05)) / 2000) = 3 √(2.99673 / 2000)
    expected = 2 + 3 * math.sqrt(703.0505 / 2e6) + 3 * math.sqrt(2.996732 / 2000)
    assert eb.bound(2.0, 3.0, 1000, 10**6, 1000, 0.05).value == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(2.0 + 0.05625 + 0.11613, abs=1e-4)


def test_document_level_bound_by_hand():
    # R̂ = 0.4, Δ = 1 (an error rate), K = 5000 bits, N = 6000 documents, s = 500, ε = 0.05
    r = 500 / 6500
    expected = (
        0.4
        + math.sqrt((5000 * math.log(2) + math.log(1 / (r * 0.05))) / 12000)
        + math.sqrt(math.log(1 / ((1 - r) * 0.05)) / 1000)
    )
    assert eb.bound(0.4, 1.0, 5000, 6000, 500, 0.05).value == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(
        0.4 + 0.53784 + 0.05546, abs=1e-4
    )  # √(3471.30 / 12000), √(3.07577 / 1000)


def test_smoothed_loss_stays_in_its_range():
    V = 65
    for alpha in (1e-4, 0.01, 0.5):
        p = torch.cat([torch.rand(10_000), torch.tensor([0.0, 1.0])]).double()
        loss = -torch.log2((1 - alpha) * p + alpha / V)
        low = -math.log2(1 - alpha + alpha / V)
        assert loss.min() >= low - 1e-9 and loss.max() <= low + eb.smoothed_range(alpha, V) + 1e-9
        assert loss.max() == pytest.approx(low + eb.smoothed_range(alpha, V))  # p = 0 reaches the top


def test_documents_split_on_the_separator():
    train_ids = np.array([5, 6, 0, 0, 7, 8, 9, 0, 0, 1, 0, 0, 0, 0, 4, 4], dtype=np.uint16)
    starts, ends = eb.documents(train_ids, [0, 0])
    assert [train_ids[a:b].tolist() for a, b in zip(starts, ends)] == [[5, 6], [7, 8, 9], [4, 4]]


def train_sublora(data_dir, out, intrinsic_dim=200, iters=20):
    """A SubLoRA run of seconds (rank 4 on q, v and the head of a 2-layer random base)."""
    keys = dict(
        adapter="sublora", intrinsic_dim=intrinsic_dim, lora_rank=4, lora_alpha=32.0, learning_rate=2e-2
    )
    train.train(
        run_args(data_dir, out, max_iters=iters, eval_interval=iters, lr_decay_iters=iters, **keys),
        environ={},
    )


def test_non_vacuous_bound_end_to_end(char_data, tmp_path):
    """SubLoRA from scratch on Tiny Shakespeare (V = 65): the token-level bits-per-character bound
    falls below log₂ 65 = 6.02, the bound of a random guess."""
    out = tmp_path / "sublora"
    train_sublora(char_data, out, intrinsic_dim=300, iters=80)
    results = eb.main(
        [f"--out_dir={out}", "--eval_blocks=2000", "--eval_docs=300", "--device=cpu", "--exact_max_tokens=0"]
    )[0]
    token = results["metrics"]["token_bpd"]
    assert token["bound"] < math.log2(65) - 0.2
    assert token["empirical"] < token["bound"]
    assert abs(results["loss_after_quantization_bits"] - results["loss_before_quantization_bits"]) < 0.05
    saved = json.loads((out / "bounds.json").read_text())
    assert saved["metrics"]["token_bpd"]["bound"] == pytest.approx(token["bound"])
    assert (out / "bound_vs_alpha.png").exists()


def test_reported_bounds_follow_the_union_over_every_choice(char_data, tmp_path):
    """A sampled evaluation that picks among 2 level counts, 3 runs, 8 α values and 32 methods (Azuma–
    Hoeffding or empirical Bernstein at one of 31 λ): the JSON's Azuma–Hoeffding bound is the formula with
    K paying ⌈log₂ 6⌉ + ⌈log₂ 8⌉ + ⌈log₂ 32⌉ bits and the sampling term ln(1536 / ((1 - r) ε)); N is the
    positions the blocks cover. Exact evaluation of the same run drops the sampling term."""
    out = tmp_path / "sublora"
    train_sublora(char_data, out)
    common = [f"--out_dir={out}", "--eval_docs=50", "--device=cpu", "--levels_grid=5,11", "--choices=seed=3"]
    r = eb.main(common + ["--eval_blocks=300", "--exact_max_tokens=0"])[0]
    n = len(np.memmap(f"{char_data}/train.bin", dtype=np.uint16, mode="r"))
    N, s, eps, V = (n - 1) // 32 * 32, 300, 0.05, 65
    assert r["N_tokens"] == N and r["s_blocks"] == s and r["levels"] in (5, 11)
    K = r["message"]["total_bits"]
    assert r["message"]["extra_bits"] == 3  # ⌈log₂(3 runs · 2 level counts)⌉
    m = r["metrics"]["token_bpd_hoeffding"]
    delta = math.log2(1 + (1 - m["alpha"]) * V / m["alpha"])
    rr = s / (s + N)
    expect = (
        m["empirical"]
        + delta * math.sqrt(((K + 8) * math.log(2) + math.log(1 / (rr * eps))) / (2 * N))
        + delta * math.sqrt(math.log(1536 / ((1 - rr) * eps)) / (2 * s))
    )
    assert m["bound"] == pytest.approx(expect, rel=1e-9)
    assert r["metrics"]["token_bpd"]["bound"] == min(m["bound"], r["metrics"]["token_bpd_bernstein"]["bound"])
    e = r["metrics"]["token_top1_error"]  # the error rows pay for their method too: 5 bits, × 32 in the union
    expect = (
        e["empirical"]
        + math.sqrt(((K + 5) * math.log(2) + math.log(1 / (rr * eps))) / (2 * N))
        + math.sqrt(math.log(192 / ((1 - rr) * eps)) / (2 * s))
    )
    assert e["bound_hoeffding"] == pytest.approx(expect, rel=1e-9)
    assert e["bound"] == min(1.0, e["bound_hoeffding"], e["bound_bernstein"])
    assert any("vocabulary was read from the corpus" in c for c in r["caveats"])
    for name, parts in r["token_bpd_parts"].items():
        assert sum(parts.values()) == pytest.approx(r["metrics"][f"token_bpd_{name}"]["bound"], rel=1e-9)
    import matplotlib.pyplot as plt

    import plots

    drawn = {}
    real_save, plots.save = plots.save, lambda f, folder, name: drawn.setdefault("ax", f.axes[0])
    try:
        plots.plot_bound_parts(str(out), r)
    finally:
        plots.save = real_save
    bars = [
        (p.get_x(), p.get_y(), p.get_height()) for p in drawn["ax"].patches
    ]  # two stacked bars: each part on the last
    for k, name in enumerate(r["token_bpd_parts"]):
        mine = bars[5 * k : 5 * k + 5]
        assert [h for _, _, h in mine] == pytest.approx(list(r["token_bpd_parts"][name].values()))
        assert mine[-1][1] + mine[-1][2] == pytest.approx(r["metrics"][f"token_bpd_{name}"]["bound"])
    plt.close("all")
    assert r["token_bpd_parts"]["hoeffding"]["sampling"] == pytest.approx(
        delta * math.sqrt(math.log(1536 / ((1 - rr) * eps)) / (2 * s))
    )

    exact = eb.main([a for a in common if not a.startswith("--levels_grid")] + ["--overwrite=True"])[
        0
    ]  # every block scored
    m = exact["metrics"]["token_bpd_hoeffding"]
    K = exact["message"]["total_bits"] + 8
    delta = math.log2(1 + (1 - m["alpha"]) * V / m["alpha"])
    assert exact["exact"] and exact["s_blocks"] is None
    assert m["bound"] == pytest.approx(
        m["empirical"] + delta * math.sqrt((K * math.log(2) + math.log(1 / eps)) / (2 * N)), rel=1e-9
    )
    assert all(parts["sampling"] == 0 for parts in exact["token_bpd_parts"].values())  # not a remainder


def test_an_adapter_message_holds_only_what_training_changed(tmp_path):
    """PiSSA with an NF4 residual and NF4 components: the frozen U, V and NF4 codes are prior, not
    message; quantising the message leaves every buffer bit-identical."""
    from adapters import count_params, inject_adapters
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=65, bias=False))
    inject_adapters(
        model,
        "pissa",
        rank=4,
        alpha=4.0,
        method="way0",
        quantize_residual=True,
        quantize_base_components=True,
    )
    state = eb.message_vector(model)
    assert sum(v.numel() for v in state.values()) == count_params(model)[0]
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    groups = eb.message_groups(state)
    coded = eb.quantize_message(state, groups, 5, "kmeans")
    eb.set_message(model, eb.dequantize(state, groups, coded))
    assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers())
    params = dict(model.named_parameters())
    for names in groups.values():  # each group now holds its 5 centroids only
        assert len(torch.unique(torch.cat([params[n].detach().reshape(-1) for n in names]))) <= 5


def test_bounds_json_names_its_checkpoint(char_data, tmp_path, capsys):
    """bounds.json records the iteration and SHA-256 of the checkpoint it bounded: bounded at 4, the run
    resumed to 8, the next evaluation says the old one is stale and replaces it without --overwrite; the
    same checkpoint again is refused without it."""
    lora = tmp_path / "lora"
    kw = dict(adapter="lora", lora_rank=2, eval_interval=4, init_from="scratch")
    train.train(run_args(char_data, lora, max_iters=4, **kw), environ={})
    args = [f"--out_dir={lora}", "--eval_docs=20", "--eval_blocks=50", "--exact_max_tokens=0", "--device=cpu"]
    first = eb.main(args)[0]
    digest = hashlib.sha256((lora / "ckpt.pt").read_bytes()).hexdigest()
    assert first["checkpoint"] == dict(iter_num=4, sha256=digest)
    train.train(run_args(char_data, lora, max_iters=8, **dict(kw, init_from="resume")), environ={})
    capsys.readouterr()
    eb.main(args)
    assert f"{lora}/bounds.json bounded iteration 4, not the checkpoint now in {lora} (iteration 8)" in (
        capsys.readouterr().out
    )
    assert json.loads((lora / "bounds.json").read_text())["checkpoint"]["iter_num"] == 8
    with pytest.raises(ConfigError, match=r"already holds bounds.json for this checkpoint \(iteration 8\)"):
        eb.main(args)


def test_a_prior_that_saw_the_scored_data_gives_no_bound(char_data, tmp_path, monkeypatch):
    """Every checkpoint records the data it trained on (train.bin's SHA-256, the token range, its base's
    record). With the training tokens split at a document boundary (prepare.py --prior_fraction), a
    base pretrained on the prior part and a LoRA fine-tuned on the bound part (drawing its batches there
    alone) is bounded on the bound part with no caveat about its base; a base that trained on the whole
    file overlaps the scored tokens: no bound, one line naming both ranges. A changed train.bin is
    refused. A base that records nothing (an older checkpoint) keeps the caveat in words."""
    import shutil

    import prepare

    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    prepare.split_parts(str(data), 0.5)
    a, n = json.loads((data / "meta.json").read_text())["parts"]["bound"]
    ids = np.fromfile(data / "train.bin", dtype=np.uint16)
    assert n == len(ids) and 0.5 * n <= a < 0.6 * n and ids[a - 2 : a].tolist() == [0, 0]  # after "\n\n"
    drawn = []
    real = train.get_batch
    monkeypatch.setattr(
        train, "get_batch", lambda d, split, ix, *rest: drawn.append((split, ix)) or real(d, split, ix, *rest)
    )
    kw = dict(max_iters=4, eval_interval=4)
    train.train(run_args(str(data), tmp_path / "prior_base", data_part="prior", **kw), environ={})
    assert all(int(ix.max()) + 33 <= a for split, ix in drawn if split == "train")  # steps and evals
    lora = dict(adapter="lora", lora_rank=2, data_part="bound", **kw)
    drawn.clear()
    train.train(
        run_args(str(data), tmp_path / "ft", init_from=str(tmp_path / "prior_base"), **lora), environ={}
    )
    assert drawn and all(int(ix.min()) >= a for split, ix in drawn if split == "train")
    record = load_checkpoint(str(tmp_path / "ft"))["provenance"]
    assert (
        record["range"] == [a, n]
        and record["base"]["range"] == [0, a]
        and record["base"]["base"] == "scratch"
    )
    args = ["--eval_docs=20", "--eval_blocks=50", "--exact_max_tokens=0", "--device=cpu"]
    r = eb.main([f"--out_dir={tmp_path / 'ft'}", *args])[0]
    assert (
        not any("base" in c for c in r["caveats"]) and r["N_tokens"] == (n - a - 1) // 32 * 32
    )  # whole blocks
    train.train(run_args(str(data), tmp_path / "all_base", **kw), environ={})
    train.train(
        run_args(str(data), tmp_path / "ft2", init_from=str(tmp_path / "all_base"), **lora), environ={}
    )
    with pytest.raises(
        ConfigError,
        match=f"trained on tokens \\[0, {n:,}\\) of train.bin, which overlap the scored tokens \\[{a:,}, {n:,}\\)",
    ):
        eb.main([f"--out_dir={tmp_path / 'ft2'}", *args])
    old = load_checkpoint(str(tmp_path / "ft"))
    old["provenance"]["base"] = "unrecorded: out-old-base"
    checkpoint.save_checkpoint(old, str(tmp_path / "ft" / "ckpt.pt"))
    r = eb.main([f"--out_dir={tmp_path / 'ft'}", "--overwrite=True", *args])[0]
    assert any(
        "the base comes from 'out-old-base', which records no training data" in c for c in r["caveats"]
    )
    ids[a + 5] = (ids[a + 5] + 1) % 65
    ids.tofile(data / "train.bin")
    with pytest.raises(ConfigError, match="train.bin changed since the run trained on it"):
        eb.main([f"--out_dir={tmp_path / 'ft'}", "--overwrite=True", *args])


def test_a_sweep_pays_for_its_runs_without_being_asked(char_data, tmp_path, capsys):
    """eval_bounds --sweep_dir over 3 runs and no --choices: each bound pays ⌈log₂ 3⌉ = 2 bits (choosing
    the best of the sweep is a choice made by looking at the results)."""
    for seed in range(3):
        train.train(
            run_args(
                char_data,
                tmp_path / "sweep" / f"run{seed}",
                adapter="sublora",
                intrinsic_dim=100,
                lora_rank=4,
                max_iters=2,
                eval_interval=2,
                sublora_seed=seed,
            ),
            environ={},
        )
    results = eb.main(
        [
            f"--sweep_dir={tmp_path / 'sweep'}",
            "--eval_docs=8",
            "--eval_blocks=8",
            "--exact_max_tokens=0",
            "--device=cpu",
        ]
    )
    assert len(results) == 3 and all(r["message"]["extra_bits"] == 2 for r in results)
    assert "the sweep holds 3 runs and --choices covers 1" in capsys.readouterr().out


def test_non_finite_logits_give_no_bound():
    """A nan logit ranks below nothing (every comparison is false): its top-k error would read 0 while the
    bits are nan. Refused instead."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=65, bias=False))
    with torch.no_grad():
        model.lm_head.weight[3] = float("nan")
    x = torch.randint(0, 65, (2, 8))
    with pytest.raises(ValueError, match="logits hold nan or inf"):
        eb.per_token_stats(model, x, x, [0.1], [1, 10], 65)


def test_fan_grama_liu_inequality():
    """exp(λξ − ψ(λ)ξ²) ≤ 1 + λξ for every ξ ≥ −1 and λ ∈ [0, 1): the step the empirical-Bernstein proof
    rests on. It fails below ξ = −1, which is why the centre must lie in the loss's range."""
    xi = np.linspace(-1, 50, 200_001)[:, None]
    lam = np.array(eb.LAMBDAS)[None, :]
    assert (np.exp(lam * xi - eb.psi(lam) * xi**2) <= 1 + lam * xi + 1e-12).all()
    assert np.exp(0.9 * -1.5 - eb.psi(0.9) * 2.25) > 1 + 0.9 * -1.5


def segments_martingale(rng, H, J, n, scenario):
    """H independent loss sequences of J·n tokens in [0, 1]. In segment j each token is a two-point loss
    (u or v, v with probability p), u, v, p chosen from the past (whether the last segment came out high),
    so the conditional means are known and change with the past. Returns per sequence the mean loss, the
    mean squared distance to the predictable centre m, and the mean conditional mean (what is bounded)."""
    S1, S2, mu, high = np.zeros(H), np.zeros(H), np.zeros(H), np.zeros(H, bool)
    for _ in range(J):
        u, v, p, m = (np.broadcast_to(np.asarray(t, np.float64), (H,)) for t in scenario(high))
        count = rng.binomial(n, p)  # the segment's tokens equal to v: the sums follow from the count
        S1 += n * u + count * (v - u)
        S2 += (n - count) * (u - m) ** 2 + count * (v - m) ** 2
        mu += n * (u + p * (v - u))
        high = count > n * p
    return S1 / (J * n), S2 / (J * n), mu / (J * n)


SCENARIOS = {  # (u, v, p, centre) from the past; and the per-token variance the λ grid is centred on
    "same mean, spread from the past": (
        lambda h: (np.where(h, 0.40, 0.45), np.where(h, 0.60, 0.55), 0.5, 0.5),
        0.0056,
    ),
    "skewed: rare full-range loss": (
        lambda h: (0.0, 1.0, np.where(h, 0.06, 0.05), np.where(h, 0.06, 0.05)),
        0.052,
    ),
    "heavy range, low variance, centre off": (
        lambda h: (0.1, 1.0, np.where(h, 0.011, 0.01), 0.1 + 0.009),
        0.0081,
    ),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_the_bernstein_bound_covers_martingale_losses_and_a_halved_variance_term_does_not(scenario):
    """1,024 hypotheses (K = 10 bits, + 2 for a 4-value λ grid), each a martingale of 10⁶ losses; the one
    with the smallest bound is chosen. Over 2,000 draws its mean conditional loss exceeds its bound in at
    most ε = 1% of them (+ 3 binomial standard errors); with the variance term halved, far more often. With
    the default 31-value λ grid the bound covers too."""
    make, V = SCENARIOS[scenario]
    rng = np.random.default_rng(0)
    H, J, n, eps, draws = 1024, 10, 100_000, 0.01, 2000
    lam = math.sqrt(2 * math.log(4 * H / eps) / (J * n * V))  # fixed before the data, from the known variance
    grid = [lam / 2, lam / math.sqrt(2), lam, lam * math.sqrt(2)]
    slack = 3 * math.sqrt(eps * (1 - eps) / draws)

    def failure_rate(halve, lambdas, draws):
        fails = 0
        for _ in range(draws):
            mean, second, mu = segments_martingale(rng, H, J, n, make)
            b = eb.bernstein(
                mean, second / (2 if halve else 1), 1.0, math.log2(H * len(lambdas)), J * n, eps, lambdas
            ).value
            fails += mu[b.argmin()] > b[b.argmin()]
        return fails / draws

    assert failure_rate(False, grid, draws) <= eps + slack
    assert failure_rate(True, grid, draws) > eps + slack
    assert failure_rate(False, eb.LAMBDAS, 200) <= eps + 3 * math.sqrt(eps * (1 - eps) / 200)


def test_the_bernstein_bounds_equal_the_theorems_in_float64():
    """Theorem 2 (every point) and theorem 3 (sampled blocks, Maurer & Pontil's empirical Bernstein),
    computed here from their statements over the raw per-token arrays, equal eval_bounds' numbers."""
    rng = np.random.default_rng(1)
    blocks, T, delta, K, eps = 400, 16, 7.5, 3000, 0.05
    x = rng.gamma(2.0, 1.0, (blocks, T)).clip(0, delta)  # losses
    m = (x + rng.normal(0, 0.5, x.shape)).clip(0, delta)  # some predictable centre in the range
    N = x.size
    best = math.inf
    for lam in eb.LAMBDAS:
        psi = -math.log(1 - lam) - lam
        best = min(
            best,
            x.mean()
            + psi / (lam * delta) * ((x - m) ** 2).mean()
            + delta * (K * math.log(2) + math.log(1 / eps)) / (lam * N),
        )
    assert float(eb.bernstein(x.mean(), ((x - m) ** 2).mean(), delta, K, N, eps).value) == pytest.approx(
        best, rel=1e-12
    )

    s, N_all, M = 100, 10**6, 7  # s of the blocks sampled; N_all positions in the corpus
    bx, bq = x[:s].mean(1), ((x[:s] - m[:s]) ** 2).mean(1)
    r = s / (s + N_all)
    best = math.inf
    for lam in eb.LAMBDAS:
        c = (-math.log(1 - lam) - lam) / (lam * delta)
        z = bx + c * bq  # block means of loss + c (loss − centre)², i.i.d. in [0, Δ + cΔ²]
        dev = math.log(2 * M / ((1 - r) * eps))
        mp = (
            z.mean()
            + math.sqrt(2 * z.var(ddof=1) * dev / s)
            + 7 * (delta + c * delta**2) * dev / (3 * (s - 1))
        )
        best = min(best, mp + delta * (K * math.log(2) + math.log(1 / (r * eps))) / (lam * N_all))
    assert eb.bernstein_sampled(eb.block_stats(bx, bq), delta, K, N_all, s, eps, M).value == pytest.approx(
        best, rel=1e-10
    )


@pytest.fixture(scope="module")
def tiny_base(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bounds_base")
    train.train(run_args(char_data, out, max_iters=4, eval_interval=4), environ={})
    return str(out)


def scored_and_prior(out, data_dir, levels=5):
    """The model eval_bounds scores (the checkpoint with its message quantised) and the receiver's prior."""
    from checkpoint import build_model, initial_model, load_checkpoint
    from prepare import read_meta

    ckpt = load_checkpoint(str(out))
    model = build_model(ckpt).eval()
    state = eb.message_vector(model)
    groups = eb.message_groups(state)
    coded = eb.quantize_message(state, groups, levels, "kmeans")
    msg = eb.message_length([(symbols.tolist(), levels) for _, symbols in coded.values()])
    message = eb.dequantize(state, groups, eb.send_raw(state, groups, coded, msg["sent_raw"]))
    eb.set_message(model, message)
    return model, initial_model(ckpt, read_meta(data_dir)).eval(), message


def test_the_prior_and_the_decoded_message_rebuild_the_scored_model(
    family_case, char_data, tiny_base, tmp_path
):
    """For every family case: the base the run names (a trained run, or the seeded random init for a
    family whose setting is a random base), fresh adapters from the run's seed, and the decoded message
    give the scored model's logits bit for bit; before the message is written they differ (the message
    is what training changed). A case the family calls unboundable (folded rotations) fails the check."""
    from adapters import family_of
    from checkpoint import CheckpointError

    keys = case_run_keys(family_case, learning_rate=3e-2)
    family = family_of(keys["adapter"])
    keys.setdefault("init_from", "scratch" if family.scratch_base else tiny_base)
    out = tmp_path / "run"
    train.train(run_args(char_data, out, **keys), environ={})
    model, prior, message = scored_and_prior(out, char_data)
    x = torch.randint(65, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.equal(prior(x, x)[0], model(x, x)[0])
        if family.unboundable(keys):
            with pytest.raises(CheckpointError, match="is not the scored model"):
                eb.check_rebuild(prior, model, message, x, x, family_case)
            return
        eb.check_rebuild(prior, model, message, x, x, family_case)
        assert torch.equal(prior(x, x)[0], model(x, x)[0])


def test_folded_pissa_rotations_and_a_changed_base_are_refused(char_data, tiny_base, tmp_path, capsys):
    """Folding writes learned rotations into U and V, which the message leaves out: eval_bounds refuses in
    one line before any work, and the rebuild check alone names U and V. A base run retrained after
    the fine-tune makes the prior another model: refused, naming the tensors that differ."""
    from checkpoint import CheckpointError
    from configurator import ConfigError

    fold = tmp_path / "fold"
    train.train(
        run_args(
            char_data,
            fold,
            adapter="pissa",
            lora_rank=2,
            pissa_method="way1",
            pissa_fold_every=2,
            init_from=tiny_base,
            learning_rate=3e-2,
            max_iters=4,
            eval_interval=4,
        ),
        environ={},
    )
    with pytest.raises(ConfigError, match="pissa_fold_every > 0 folded the learned rotations"):
        eb.main([f"--out_dir={fold}", "--device=cpu"])
    model, prior, message = scored_and_prior(fold, char_data)
    x = torch.randint(65, (2, 32), generator=torch.Generator().manual_seed(0))
    with pytest.raises(CheckpointError, match=r"attn\.c_attn\.U.*differ from the prior"):
        eb.check_rebuild(prior, model, message, x, x, "fold")

    import shutil

    import prepare

    base, lora, parts = tmp_path / "base", tmp_path / "lora", tmp_path / "parts"
    shutil.copytree(char_data, parts)  # the base on one part, the LoRA on the other: a valid prior
    prepare.split_parts(str(parts), 0.5)
    kw = dict(max_iters=2, eval_interval=2)
    train.train(run_args(str(parts), base, data_part="prior", **kw), environ={})
    lora_kw = dict(adapter="lora", lora_rank=2, init_from=str(base), data_part="bound")
    train.train(run_args(str(parts), lora, **lora_kw, **kw), environ={})
    train.train(run_args(str(parts), base, data_part="prior", seed=7, overwrite=True, **kw), environ={})
    with pytest.raises(CheckpointError, match=r"transformer\..*differ from the prior.*Check that the base"):
        eb.main([f"--out_dir={lora}", "--device=cpu", "--eval_docs=4"])


def test_bounds_json_holds_what_recomputes_both_bounds(char_data, tmp_path):
    """Every training position scored: the per-α mean loss and mean squared distance to the model's own
    expected loss, recomputed here in float64 from the scored model over the whole training set, equal
    bounds.json's inputs; from those inputs, N, K, ε and the grids, both bounds follow as stated."""
    out = tmp_path / "sublora"
    train_sublora(char_data, out)
    r = eb.main([f"--out_dir={out}", "--eval_docs=20", "--device=cpu", "--levels=5", "--alphas=0.001,0.1"])[0]
    saved = json.loads((out / "bounds.json").read_text())
    model, _, _ = scored_and_prior(out, char_data)
    data = np.memmap(f"{char_data}/train.bin", dtype=np.uint16, mode="r")
    block, V = 32, 65
    n_blocks = (len(data) - 1) // block
    ids = torch.from_numpy(data[: n_blocks * block + 1].astype(np.int64))
    x, y = ids[:-1].view(n_blocks, block), ids[1:].view(n_blocks, block)
    with torch.no_grad():
        p = torch.cat(
            [
                torch.softmax(model(x[i : i + 512], y[i : i + 512])[0].double(), -1)
                for i in range(0, n_blocks, 512)
            ]
        )
    p_y = p.gather(-1, y[..., None]).squeeze(-1)
    N, K, eps = saved["N_tokens"], saved["K_bits"]["bpd"], 1 - saved["confidence"]
    assert N == n_blocks * block and K == saved["message"]["total_bits"] + 1 + 5  # α: 1 bit, method: 5
    for alpha, inputs, ah, be in zip(
        saved["alphas"],
        saved["token_bpd_inputs"],
        saved["metrics"]["token_bpd_hoeffding"]["per_alpha"],
        saved["metrics"]["token_bpd_bernstein"]["per_alpha"],
    ):
        loss = -torch.log2((1 - alpha) * p_y + alpha / V)
        centre = -(p * torch.log2((1 - alpha) * p + alpha / V)).sum(-1)
        assert inputs["mean_x"] == pytest.approx(loss.mean().item(), rel=1e-5)
        assert inputs["mean_q"] == pytest.approx((loss - centre).square().mean().item(), rel=1e-4)
        delta = math.log2(1 + (1 - alpha) * V / alpha)
        C = K * math.log(2) + math.log(1 / eps)
        assert ah == pytest.approx(inputs["mean_x"] + delta * math.sqrt(C / (2 * N)), rel=1e-12)
        assert be == pytest.approx(
            min(
                inputs["mean_x"]
                + (-math.log(1 - lam) - lam) / (lam * delta) * inputs["mean_q"]
                + delta * C / (lam * N)
                for lam in saved["lambdas"]
            ),
            rel=1e-12,
        )
    assert r["metrics"]["token_bpd"]["bound"] == min(
        min(saved["metrics"]["token_bpd_hoeffding"]["per_alpha"]),
        min(saved["metrics"]["token_bpd_bernstein"]["per_alpha"]),
    )
    # the top-k error rows: the error rate and its squared distance to 1 - (the top k's probability)
    C = (saved["message"]["total_bits"] + 5) * math.log(2) + math.log(1 / eps)
    for k in (1, 10):
        top = p.topk(k, dim=-1)
        error = 1.0 - (top.indices == y[..., None]).any(-1).double()
        inputs, row = saved["token_error_inputs"][str(k)], saved["metrics"][f"token_top{k}_error"]
        assert inputs["mean_x"] == pytest.approx(error.mean().item(), rel=1e-6)
        centre = 1 - top.values.sum(-1)
        assert inputs["mean_q"] == pytest.approx((error - centre).square().mean().item(), rel=1e-4)
        assert row["bound_hoeffding"] == pytest.approx(inputs["mean_x"] + math.sqrt(C / (2 * N)), rel=1e-12)
        be = min(
            inputs["mean_x"] + (-math.log(1 - lam) - lam) / lam * inputs["mean_q"] + C / (lam * N)
            for lam in saved["lambdas"]
        )
        assert row["bound_bernstein"] == pytest.approx(be, rel=1e-12)
        assert row["bound"] == min(1.0, row["bound_hoeffding"], row["bound_bernstein"])
    assert (
        "not the loss on unseen text" in saved["meaning"]["token"]
        and "independent" in saved["meaning"]["document"]
    )


def test_the_rebuild_check_compares_every_tensor(char_data, tiny_base, tmp_path):
    """Logits on one probe can miss a change: the position embedding of a position the probe does not
    reach moved by +0.5, a frozen weight moved by one ulp, a buffer changed. Each is refused before any
    scoring, naming the tensor; the untouched model passes."""
    from checkpoint import CheckpointError

    out = tmp_path / "run"
    keys = case_run_keys("pissa_way0", learning_rate=3e-2, init_from=tiny_base)
    train.train(run_args(char_data, out, **keys), environ={})
    _, prior, message = scored_and_prior(out, char_data)
    eb.set_message(prior, message)
    x = torch.tensor([[1, 2, 3, 4]])  # positions 0..3 only
    one_ulp = lambda t: t.copy_(torch.nextafter(t, t + 1))  # noqa: E731
    changes = {
        "transformer.wpe.weight": lambda t: t[20].add_(0.5),
        "transformer.h.0.mlp.c_fc.base.weight": lambda t: one_ulp(t.view(-1)[7:8]),
        "transformer.h.1.attn.c_attn.U": lambda t: t.view(-1)[0].mul_(2),
    }
    for name, change in changes.items():
        model = scored_and_prior(out, char_data)[0]
        with torch.no_grad():
            change(eb.every_tensor(model)[name])
        if name == "transformer.wpe.weight":  # the probe alone would not see it
            assert torch.equal(model(x, x)[0], prior(x, x)[0])
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            eb.check_rebuild(prior, model, message, x, x, name)
    eb.check_rebuild(prior, scored_and_prior(out, char_data)[0], message, x, x, "untouched")


def test_fewer_than_two_sampled_blocks_are_refused(tmp_path):
    from configurator import ConfigError

    with pytest.raises(ConfigError, match="eval_blocks"):
        eb.main([f"--out_dir={tmp_path}", "--eval_blocks=1"])


def same_numbers(a, b, path=""):
    """Every number of two bounds.json trees equal to 1e-12 relative (timings apart); their lists of
    differences."""
    if isinstance(a, dict):
        keys = set(a) | set(b)
        return [
            d for k in sorted(keys - {"seconds"}) for d in same_numbers(a.get(k), b.get(k), f"{path}.{k}")
        ]
    if isinstance(a, list):
        if len(a) != len(b):
            return [path]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same_numbers(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if a == b or abs(a - b) <= 1e-12 * max(abs(a), abs(b)) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.mark.parametrize("exact", [False, True])
def test_torchrun_scoring_equals_one_process(char_data, tmp_path, exact):
    """torchrun --nproc_per_node=2 eval_bounds.py shares the scored blocks and documents between the
    processes (gloo on the CPU), codes the message once (and tunes it once), and writes the bounds.json
    one process writes: every number equal to 1e-12 relative, for sampled blocks and for every
    position."""
    import subprocess
    import sys

    from conftest import HERE

    run = tmp_path / "run"
    kw = dict(adapter="lora", lora_rank=2, max_iters=4, eval_interval=4, init_from="scratch")
    train.train(run_args(char_data, run, **kw), environ={})
    args = [f"--out_dir={run}", "--eval_docs=30", "--eval_blocks=40", "--device=cpu", "--batch_size=8"]
    args += ["--levels_grid=5,7", "--qat_steps=2", f"--exact_max_tokens={10**7 if exact else 0}"]
    if exact:  # every position: a shorter train.bin keeps it quick
        ids = np.fromfile(f"{char_data}/train.bin", dtype=np.uint16)[:20000]
        data = tmp_path / "data"
        data.mkdir()
        for f in ("val.bin", "meta.json"):
            (data / f).write_bytes(open(f"{char_data}/{f}", "rb").read())
        ids.tofile(data / "train.bin")
        train.train(run_args(str(data), run, overwrite=True, **kw), environ={})
    eb.main(args)
    one = json.loads((run / "bounds.json").read_text())
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            os.path.join(HERE, "eval_bounds.py"),
            *args,
            "--overwrite=True",
        ],
        cwd=HERE,
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count(f"wrote {run}/bounds.json") == 1  # process 0 alone prints and writes
    two = json.loads((run / "bounds.json").read_text())
    assert two["exact"] is exact and not same_numbers(one, two), same_numbers(one, two)[:5]
