"""Compressed snapshots: a held copy's weights in bf16 or int8 (checkfree/stage/encoding.py), restored by decoding
exactly what its kind declares, and priced at their encoded size."""

from __future__ import annotations

import pytest
import torch

from checkfree.model.presets import preset
from checkfree.plan import BF16, INT8, SNAPSHOT_BF16, SNAPSHOT_INT8, Held, Rebuild
from checkfree.recovery import StrategyConfig, strategy_class
from checkfree.simulation.cost import CostModel
from checkfree.simulation.networks import NetworkConfig
from checkfree.stage.compute import StageCompute
from checkfree.stage.encoding import decode, encode
from checkfree.storage.checkpoints import nbytes


def test_int8_codes_and_scales_on_a_hand_made_matrix():
    """Row 0: absmax 2.54, scale 0.02, codes 127 / -50 / 25 (exact on the grid); row 1: all zero, scale 0;
    a vector is one channel."""
    w = torch.tensor([[2.54, -1.0, 0.5], [0.0, 0.0, 0.0]])
    copy = encode({"w": w, "v": torch.tensor([0.5, -0.25])}, INT8)
    assert copy["weights"]["w"].dtype == torch.int8 and copy["weights"]["w"].tolist() == [[127, -50, 25], [0, 0, 0]]
    assert torch.allclose(copy["scales"]["w"], torch.tensor([0.02, 0.0]))
    assert copy["weights"]["v"].tolist() == [127, -64] and torch.allclose(copy["scales"]["v"], torch.tensor([0.5 / 127]))
    back = decode(copy, INT8)
    assert torch.allclose(back["w"], w, atol=1e-6) and torch.equal(back["w"][1], torch.zeros(3))


def test_int8_and_bf16_round_trips_stay_within_their_bounds():
    torch.manual_seed(0)
    w = torch.randn(64, 48) * torch.linspace(0.01, 3.0, 64)[:, None]  # rows of very different scales
    copy = encode({"w": w}, INT8)
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    err = (decode(copy, INT8)["w"] - w).abs()
    assert bool((err <= scale / 2 + 1e-7).all())  # each weight within half its row's step
    assert err.max() > 0  # and it is lossy
    # bf16 keeps 8 significant bits: a relative error of at most 2**-8 (round to nearest).
    rel = ((decode(encode({"w": w}, BF16), BF16)["w"] - w).abs() / w.abs()).max()
    assert 0 < rel <= 2**-8


def test_a_copy_is_never_cast_from_another_dtype_than_its_encoding_declares():
    w = {"w": torch.randn(4, 4)}
    with pytest.raises(TypeError, match="declared int8 holds torch.float32"):
        decode({"weights": w}, INT8)
    with pytest.raises(TypeError, match="declared bf16 holds torch.int8"):
        decode(encode(w, INT8), BF16)


def test_encoded_bytes_are_one_or_two_per_parameter_and_a_restore_starts_a_fresh_adam(tiny_stages):
    owner, target = StageCompute(tiny_stages[1], lr=1e-3), StageCompute(tiny_stages[2], lr=1e-3)
    params = sum(p.numel() for p in tiny_stages[1].parameters())
    rows = sum(t.shape[0] if t.dim() > 1 else 1 for t in tiny_stages[1].state_dict().values())
    int8 = owner.held_copy(Held(SNAPSHOT_INT8, 1, 2))
    assert nbytes(int8) == params + 4 * rows  # a code per weight, an fp32 scale per row
    assert nbytes(owner.held_copy(Held(SNAPSHOT_BF16, 1, 2))) == 2 * params
    # Restored on a new node: exactly the decoded weights, a fresh Adam at the plan's lr.
    target.apply(Rebuild(1, "snapshot_int8", fresh_seed=3, restore=Held(SNAPSHOT_INT8, 1, 2), lr=1.1e-3), [], int8)
    decoded = decode(int8, INT8)
    assert all(torch.equal(target.stage.state_dict()[k], decoded[k]) for k in decoded)
    assert target.lr == 1.1e-3 and target.optimizer.state == {}


def test_every_auto_prices_the_encoded_copy_not_a_whole_state():
    """At llama_500m on one link: a copy's host copy and send scale with its bytes a parameter, so without the
    link's latency an int8 snapshot takes 1/12 and a bf16 one 1/6 of a whole state's time."""
    network = NetworkConfig(name="single_cluster", bandwidth_Bps=1.25e6)
    cost = CostModel(preset("llama_500m"), 4, 16, network)
    latency = network.latency_s
    full = cost.background_copy_seconds("peer")
    for encoding, fraction in (("int8", 1 / 12), ("bf16", 1 / 6)):
        cls = strategy_class("compressed_snapshot")
        per_param = cls.background_bytes_per_param(StrategyConfig(name="compressed_snapshot", encoding=encoding))
        encoded = cost.background_copy_seconds("peer", per_param)
        assert encoded == pytest.approx([latency + (f - latency) * fraction for f in full], rel=1e-12)
    # An intermediate stage of llama_500m (805 MB as a whole state) sends 67.1 MB in int8: 53.7 s at 10 Mb/s.
    middle = cost.params[2]
    assert middle * 12 == pytest.approx(805e6, rel=2e-3)
    assert cost.background_copy_seconds("peer", 1.0)[2] == pytest.approx(
        middle / network.host_bandwidth_Bps + latency + middle / 1.25e6)
