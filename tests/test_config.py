import dataclasses
import json
import os
import subprocess
import sys

import pytest

from arbd import config
from arbd.config import (ARBConfig, get_preset, logical_ternary_weights,
                         total_logical_ternary_weights)

# Seed 14's table, written out here on purpose (not imported from arbd.config) so the test checks
# the module against the seed, not against itself.
SEED14 = {
    "Embedding + text sequencer": 33.5e6,
    "Shared VQ + VQ bridge": 640.9e6,
    "MoEGraph": 429.0e6,
    "KG VQ + composite proposal": 329.3e6,
    "Router": 12.9e6,
    "ByteHead": 626.9e6,
    "Video/Talker heads": 112.2e6,
    "MLA attention": 826.8e6,
}

FLAG_AREAS = {  # flag -> areas that must shrink when it is off
    "use_attention": ["MLA attention"],
    "use_vq": ["Shared VQ + VQ bridge"],
    "use_graph": ["KG VQ + composite proposal", "MoEGraph"],
    "use_moe": ["MoEGraph"],
    "use_output_router": ["Router"],
    "use_video_head": ["Video/Talker heads"],
    "use_talker_head": ["Video/Talker heads"],
}


def test_seed_constants():
    assert config.SHARED_VQ_SIZE == 10_000_000 and config.KGVQ_CODEBOOK_SIZE == 5_000_000
    assert config.CODEBOOK_DIM == 64 and config.TRIGRAM_DIM == 7168
    assert config.SCALE_K == 16 and config.TRITS_PER_BYTE == 5 and 3**config.TRITS_PER_BYTE <= 256


@pytest.mark.parametrize("area", list(SEED14))
def test_arb3b_area_within_5pct_of_seed(area):
    n = logical_ternary_weights(get_preset("arb-3b"))[area]
    assert abs(n - SEED14[area]) / SEED14[area] < 0.05, (area, n)


def test_arb3b_total_within_2pct():
    cfg = get_preset("arb-3b")
    assert list(logical_ternary_weights(cfg)) == list(SEED14)  # exactly the 8 seed areas
    assert abs(total_logical_ternary_weights(cfg) - 3.012e9) / 3.012e9 < 0.02
    assert cfg.d_model == config.TRIGRAM_DIM and cfg.shared_vq_size == config.SHARED_VQ_SIZE
    assert cfg.kgvq_size == config.KGVQ_CODEBOOK_SIZE and cfg.hca_stride == config.MLA_HCA_STRIDE


def test_presets_sizes():
    assert set(config.PRESETS) == {"arb-tiny", "arb-small", "arb-3b"}
    assert total_logical_ternary_weights(get_preset("arb-tiny")) < 2_000_000
    assert 100e6 <= total_logical_ternary_weights(get_preset("arb-small")) <= 300e6
    for name in config.PRESETS:  # every preset exercises every component
        cfg = get_preset(name)
        assert all(getattr(cfg, flag) for flag in FLAG_AREAS)


def test_unknown_preset_names_valid_ones():
    with pytest.raises(ValueError) as e:
        get_preset("arb-7b")
    msg = str(e.value)
    assert "arb-7b" in msg and all(name in msg for name in ("arb-tiny", "arb-small", "arb-3b"))


def test_overrides():
    tiny = get_preset("arb-tiny")
    assert tiny.with_overrides(n_layers=3).n_layers == 3 and tiny.n_layers == 2
    with pytest.raises(ValueError, match="n_layerz"):
        tiny.with_overrides(n_layerz=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny.n_layers = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"d_model": 0}, "d_model"),
        ({"n_heads": -1}, "n_heads"),
        ({"n_experts": 0}, "n_experts"),
        ({"expert_hidden": 1.5}, "expert_hidden"),
        ({"use_vq": "no"}, "use_vq"),
        ({"qk_rope_dim": 7}, "qk_rope_dim"),
        ({"moe_top_k": 5}, "moe_top_k"),  # arb-tiny has 4 experts
        ({"norm_eps": 0.0}, "norm_eps"),
    ],
)
def test_invalid_values_rejected(kw, field):
    with pytest.raises(ValueError, match=field) as e:
        get_preset("arb-tiny").with_overrides(**kw)
    assert repr(next(iter(kw.values()))) in str(e.value)  # the message shows what was given


@pytest.mark.parametrize("flag", list(FLAG_AREAS))
def test_flag_off_drops_its_areas(flag):
    on = get_preset("arb-tiny")
    off = on.with_overrides(**{flag: False})
    c_on, c_off = logical_ternary_weights(on), logical_ternary_weights(off)
    for area in FLAG_AREAS[flag]:
        assert c_off[area] < c_on[area]
    for area in set(SEED14) - set(FLAG_AREAS[flag]):
        assert c_off[area] == c_on[area]


def test_all_flags_off_leaves_sequencer_and_bytehead():
    off = get_preset("arb-tiny").with_overrides(**{f: False for f in FLAG_AREAS})
    left = {a for a, n in logical_ternary_weights(off).items() if n}
    assert left == {"Embedding + text sequencer", "ByteHead"}


def test_tiny_counts_by_hand():
    c = get_preset("arb-tiny")
    d, h = c.d_model, c.n_heads
    per_layer = (
        d * c.q_lora_rank + c.q_lora_rank
        + c.q_lora_rank * h * (c.qk_nope_dim + c.qk_rope_dim)
        + d * (c.kv_lora_rank + c.qk_rope_dim) + c.kv_lora_rank
        + c.kv_lora_rank * h * (c.qk_nope_dim + c.v_head_dim)
        + h * c.v_head_dim * d + d
    )
    counts = logical_ternary_weights(c)
    assert counts["MLA attention"] == c.n_layers * per_layer
    vq = 2 * d * c.codebook_dim + c.shared_vq_size * c.codebook_dim + d
    assert counts["Shared VQ + VQ bridge"] == vq
    assert counts["Embedding + text sequencer"] == 256 * c.byte_embed_dim + 3 * c.byte_embed_dim * d


def test_cli_prints_table():
    out = subprocess.run(
        [sys.executable, "-m", "arbd.config", "arb-3b"], capture_output=True, text=True, check=True
    ).stdout
    for area, n in logical_ternary_weights(get_preset("arb-3b")).items():
        line = next(ln for ln in out.splitlines() if ln.startswith(area))
        assert f"{n / 1e6:.1f}M" in line
    assert "TOTAL" in out and "3.012B" in out


def test_cli_json_and_env_flags():
    env = {**os.environ, "ARB_TILELANG_TRAINING": "1", "ARB_RUN_SLOW_TESTS": "0"}
    code = "import arbd.config as c; print(c.ARB_TILELANG_TRAINING, c.ARB_RUN_SLOW_TESTS)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env).stdout
    assert out.split() == ["True", "False"]
    cmd = [sys.executable, "-m", "arbd.config", "arb-tiny", "--json"]
    js = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    assert js["total"] == total_logical_ternary_weights(get_preset("arb-tiny"))
    assert ARBConfig(**js["config"]) == get_preset("arb-tiny")  # the JSON config round-trips
