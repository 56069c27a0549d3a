"""
Configuration precedence and checking: defaults <- config file <- environment <- --key=value.

    python -m pytest -q test_config.py
"""

import pytest

from configurator import ConfigError, configure

DEFAULTS = dict(
    out_dir="out",
    adapter="none",
    lora_rank=8,
    lora_alpha=16.0,
    dropout=0.1,
    compile=True,
    test_mode=False,
    max_iters=100,
    start="\n",
)


def test_precedence(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text(
        "import math\nout_dir = 'from-file'\nlora_rank = 2\nlora_alpha = math.sqrt(4.0)\nmax_iters = 7\n"
    )
    env = {"LORA_RANK": "4", "USE_LORA": "True"}
    c = configure(DEFAULTS, [str(cfg), "--max_iters=9"], env)
    assert c == dict(DEFAULTS, out_dir="from-file", lora_rank=4, lora_alpha=2.0, max_iters=9, adapter="lora")
    c = configure(DEFAULTS, [str(cfg), "--lora_rank=16"], env)  # the command line beats the environment
    assert c["lora_rank"] == 16


def test_values_are_parsed_and_type_checked():
    c = configure(DEFAULTS, ["--dropout=0", "--compile=False", "--out_dir=a=b", "--start=42"], {})
    assert c["dropout"] == 0.0 and isinstance(c["dropout"], float)  # an int may stand for a float
    assert c["compile"] is False
    assert c["out_dir"] == "a=b"  # split on the first '=' only
    assert c["start"] == "42"  # a string key keeps the text
    with pytest.raises(ConfigError, match="max_iters must be int"):
        configure(DEFAULTS, ["--max_iters=1.5"], {})
    with pytest.raises(ConfigError, match="compile must be bool"):
        configure(DEFAULTS, ["--compile=yes"], {})
    with pytest.raises(ConfigError, match="LORA_RANK.*lora_rank must be int"):
        configure(DEFAULTS, [], {"LORA_RANK": "eight"})
    with pytest.raises(ConfigError, match="USE_LORA must be bool"):
        configure(DEFAULTS, [], {"USE_LORA": "maybe"})


def test_unknown_keys_and_files(tmp_path):
    with pytest.raises(
        ConfigError, match="unknown config key 'lora_rnak'.*did you mean 'lora_rank'\\? .--help"
    ):
        configure(DEFAULTS, ["--lora_rnak=4"], {})
    with pytest.raises(ConfigError, match="unknown config key 'zzz' in '--zzz=1'; .--help lists every key.$"):
        configure(DEFAULTS, ["--zzz=1"], {})
    cfg = tmp_path / "c.py"
    cfg.write_text("max_iter = 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'max_iter'; did you mean 'max_iters'"):
        configure(DEFAULTS, [str(cfg)], {})
    with pytest.raises(ConfigError, match="does not exist"):
        configure(DEFAULTS, ["config/nope.py"], {})
    with pytest.raises(ConfigError, match="--key=value"):
        configure(DEFAULTS, ["max_iters=3"], {})
    with pytest.raises(ConfigError, match="write --max_iters=VALUE"):
        configure(DEFAULTS, ["--max_iters"], {})


def test_env_bools_and_test_mode():
    small = dict(max_iters=3, out_dir="out-test")
    assert configure(DEFAULTS, [], {"USE_LORA": "1"})["adapter"] == "lora"
    assert configure(DEFAULTS, [], {"USE_LORA": "false"})["adapter"] == "none"
    c = configure(DEFAULTS, ["--out_dir=mine"], {"TEST_MODE": "True"}, test_overrides=small)
    assert c["test_mode"] and c["max_iters"] == 3 and c["out_dir"] == "mine"  # --key=value still wins
    assert configure(DEFAULTS, ["--test_mode=True"], {}, test_overrides=small)["max_iters"] == 3
    assert configure(DEFAULTS, [], {}, test_overrides=small)["max_iters"] == 100
