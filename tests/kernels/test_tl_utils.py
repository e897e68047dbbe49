"""The host-side tile choices shared by the kernel families (dp_attn/kernels/tl_utils.py)."""

import triton

from dp_attn.kernels.tl_utils import feature_block, fitted_to_layer

CONFIGS = [
    triton.Config({"BLOCK_O": 128, "BLOCK_I": 128}),
    triton.Config({"BLOCK_O": 64, "BLOCK_I": 64}),
    triton.Config({"BLOCK_O": 32, "BLOCK_I": 32}),
]
PRUNE = fitted_to_layer(lambda a: {"BLOCK_O": a["DOUT"], "BLOCK_I": a["DIN"]})["early_config_prune"]


def blocks(configs):
    return [(c.kwargs["BLOCK_O"], c.kwargs["BLOCK_I"]) for c in configs]


def test_feature_block_pads_to_a_power_of_two_between_16_and_the_cap():
    assert [feature_block(w) for w in (1, 16, 17, 40, 128, 3072)] == [16, 16, 32, 64, 128, 128]


def test_a_wide_layer_keeps_every_config():
    assert blocks(PRUNE(CONFIGS, {"DOUT": 3072, "DIN": 768})) == blocks(CONFIGS)


def test_configs_wider_than_the_layer_are_dropped():
    assert blocks(PRUNE(CONFIGS, {"DOUT": 64, "DIN": 100})) == [(64, 64), (32, 32)]


def test_a_layer_narrower_than_every_config_gets_the_smallest():
    assert blocks(PRUNE(CONFIGS, {"DOUT": 8}, DIN=4)) == [(32, 32)]
