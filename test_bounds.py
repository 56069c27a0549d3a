"""
eval_bounds.py: the arithmetic coder, quantisation, the bound formulas, and a non-vacuous bound end
to end on Tiny Shakespeare.

    python -m pytest -q test_bounds.py
"""

import json
import math
import random

import numpy as np
import pytest
import torch

import eval_bounds as eb
import train
from test_train import tiny as tiny_args


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
        centroids, symbols = eb.quantize(w, n_levels)
        assert len(centroids) == n_levels and int(symbols.max()) < n_levels
        err = (centroids[symbols] - w.double()).abs().max()
        # the nearest centroid is no farther than its own bin's mean: one bin width, 2 max|w| / levels
        # (up to the fp16 rounding of the transmitted centroids)
        assert err <= 2 * float(w.abs().max()) / n_levels + 1e-3 * float(w.abs().max())
        lengths.append(eb.message_length(symbols.tolist(), n_levels)["total_bits"])
    assert lengths == sorted(lengths) and lengths[0] < lengths[1]  # more levels, longer message
    centroids, symbols = eb.quantize(w, 2**16)
    assert (centroids[symbols] - w.double()).abs().max() < 2e-4  # fp16 centroids: ~1e-4 relative


def test_message_length_parts():
    symbols = [0] * 90 + [1] * 10
    msg = eb.message_length(symbols, 3, extra_bits=5)
    assert msg["codebook_bits"] == 48 and msg["count_bits"] == 3 * 7  # 16 per level, ⌈log₂ 101⌉ per count
    L = msg["code_bits"] + 48 + 21
    assert msg["raw_bits"] == L and msg["total_bits"] == pytest.approx(L + 2 * math.log2(L) + 5)


def test_token_level_bound_by_hand():
    # R̂ = 2, Δ = 3, K = 1000 bits, N = 10^6 tokens, s = 1000 blocks, ε = 0.05: r = 1000 / 1001000
    # complexity: 3 √((1000 · 0.693147 + ln(1 / (0.000999 · 0.05))) / 2e6) = 3 √((693.147 + 9.9035) / 2e6)
    # subsampling: 3 √(ln(1 / (0.999001 · 0.05)) / 2000) = 3 √(2.99673 / 2000)
    expected = 2 + 3 * math.sqrt(703.0505 / 2e6) + 3 * math.sqrt(2.996732 / 2000)
    assert eb.bound(2.0, 3.0, 1000, 10**6, 1000, 0.05) == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(2.0 + 0.05625 + 0.11613, abs=1e-4)


def test_document_level_bound_by_hand():
    # R̂ = 0.4, Δ = 1 (an error rate), K = 5000 bits, N = 6000 documents, s = 500, ε = 0.05
    r = 500 / 6500
    expected = 0.4 + math.sqrt((5000 * math.log(2) + math.log(1 / (r * 0.05))) / 12000) + \
        math.sqrt(math.log(1 / ((1 - r) * 0.05)) / 1000)
    assert eb.bound(0.4, 1.0, 5000, 6000, 500, 0.05) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.4 + 0.53784 + 0.05546, abs=1e-4)  # √(3471.30 / 12000), √(3.07577 / 1000)


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


def test_non_vacuous_bound_end_to_end(char_data, tmp_path):
    """SubLoRA from scratch on Tiny Shakespeare (V = 65): the token-level bits-per-character bound
    falls below log₂ 65 = 6.02, the bound of a random guess."""
    out = tmp_path / "sublora"
    train.train(tiny_args(char_data, out, adapter="sublora", intrinsic_dim=300, lora_rank=4, lora_alpha=32.0,
                          max_iters=80, eval_interval=80, learning_rate=2e-2, lr_decay_iters=80), environ={})
    results = eb.main([f"--out_dir={out}", "--eval_blocks=2000", "--eval_docs=300", "--device=cpu"])[0]
    token = results["metrics"]["token_bpd"]
    assert token["bound"] < math.log2(65) - 0.2
    assert token["empirical"] < token["bound"]
    assert abs(results["loss_after_quantization_bits"] - results["loss_before_quantization_bits"]) < 0.05
    saved = json.loads((out / "bounds.json").read_text())
    assert saved["metrics"]["token_bpd"]["bound"] == pytest.approx(token["bound"])
    assert (out / "bound_vs_alpha.png").exists()
