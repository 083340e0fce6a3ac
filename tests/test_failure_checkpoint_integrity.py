"""Issue 15, class 4: a checkpoint whose bytes were corrupted but still decode is refused, by every load path.

Two checks, one mechanism: every weights-only load (reference checkpoints, --model factory checkpoints, trainer
resume) verifies the zip archive's CRC-32s before torch.load (torch itself does not), and reference checkpoints
record a content hash of their tensors and configuration that loading recomputes (it catches a file that was
edited and saved again, whose CRC-32s are then consistent).
"""

import struct
import zipfile

import pytest
import torch

from latentdiag import CheckpointReadError, UnsafeCheckpointError, load_checkpoint
from latentdiag.adapters.inspect import inspect_checkpoint
from latentdiag.models import build_model, load_reference_checkpoint, save_checkpoint
from latentdiag.report.source import load_model

CONFIG = {"name": "mlp_vae", "kwargs": {"input_shape": [1, 4, 4], "latent_dim": 2, "hidden": [8]}}


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_model(CONFIG)
    return save_checkpoint(tmp_path / "ref.pt", model), model


def _flip_mantissa_bit(raw: bytes, tensor: torch.Tensor, index: int = 3, bit: int = 0) -> bytes:
    """Flip the lowest mantissa bit of one float32 value of ``tensor`` inside the file's bytes."""
    needle = tensor.detach().contiguous().numpy().tobytes()
    at = raw.find(needle)
    assert at > 0 and raw.find(needle, at + 1) < 0, "the tensor's bytes must occur once in the file"
    out = bytearray(raw)
    out[at + 4 * index] ^= 1 << bit
    return bytes(out)


def test_a_flipped_mantissa_bit_still_decodes_but_is_refused(saved, tmp_path):
    path, model = saved
    weight = model.state_dict()["encoder.net.0.weight"]
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(_flip_mantissa_bit(path.read_bytes(), weight))

    # the damage is silent for torch: the file decodes, to different weights
    decoded = torch.load(bad, weights_only=True)["state_dict"]["encoder.net.0.weight"]
    assert not torch.equal(decoded, weight) and torch.allclose(decoded, weight)

    with pytest.raises(CheckpointReadError) as err:
        load_checkpoint(bad)
    msg = str(err.value)
    assert "flipped.pt" in msg and "CRC-32 mismatch" in msg and "re-copy or re-save" in msg
    assert "it is corrupted: member '" in msg and "/data/" in msg     # names the member that holds the tensor
    with pytest.raises(CheckpointReadError, match="CRC-32 mismatch"):
        load_reference_checkpoint(bad)
    with pytest.raises(CheckpointReadError, match="CRC-32 mismatch"):
        load_checkpoint(bad, trusted=True)                      # trust is about code, not about damage
    with pytest.raises(ValueError, match="fails its CRC-32 check"):
        inspect_checkpoint(bad)                                 # inspect and load agree


def test_every_load_path_verifies(saved, tmp_path):
    path, model = saved
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(_flip_mantissa_bit(path.read_bytes(), model.state_dict()["decoder.net.0.bias"], 1, 5))
    factory_calls = []

    def factory(state):
        factory_calls.append(state)
        return build_model(CONFIG)

    for load in (lambda: load_model(bad), lambda: load_model(bad, factory=factory),
                 lambda: load_model(bad, factory=factory, state_dict_key="state_dict")):
        with pytest.raises(CheckpointReadError, match="CRC-32 mismatch"):
            load()
    assert factory_calls == []                                  # the factory never saw damaged weights

    from latentdiag.train.trainer import train

    with pytest.raises(CheckpointReadError, match="CRC-32 mismatch"):
        train(None, torch.zeros(8, 1, 4, 4), epochs=1, resume=bad, progress=False)
    assert load_model(path).integrity.startswith("content hash: verified")   # the intact file is fine


def test_legacy_and_plain_state_dict_files_also_get_the_crc_check(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"w": torch.arange(16, dtype=torch.float32)}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(16, dtype=torch.float32))
    raw = _flip_mantissa_bit(path.read_bytes(), torch.arange(16, dtype=torch.float32), 7, 2)
    (tmp_path / "bad.pt").write_bytes(raw)
    with pytest.raises(CheckpointReadError, match=r"'.*bad\.pt': it is corrupted: member '.*data/0'.*CRC-32 mismatch"):
        load_checkpoint(tmp_path / "bad.pt")


def test_an_edited_and_resaved_checkpoint_fails_its_content_hash(saved, tmp_path):
    from latentdiag.models.checkpoint import content_hash

    path, _ = saved
    obj = torch.load(path, weights_only=True)
    assert obj["content_sha256"] == content_hash(obj)
    edits = {
        "weight": lambda o: o["state_dict"]["encoder.net.0.weight"].view(-1)[0].add_(1e-7),
        "config": lambda o: o["model"]["kwargs"].update(latent_dim=2, hidden=[8], levels=3),
        "data": lambda o: o.update(data={"name": "mnist5k", "format": "binary"}),
        "dtype": lambda o: o["state_dict"].update({"decoder.net.0.bias": o["state_dict"]["decoder.net.0.bias"]
                                                   .double()}),
    }
    for name, edit in edits.items():
        copy = torch.load(path, weights_only=True)
        edit(copy)
        torch.save(copy, tmp_path / f"{name}.pt")                # consistent CRC-32s: only the hash sees it
        with pytest.raises(CheckpointReadError) as err:
            load_reference_checkpoint(tmp_path / f"{name}.pt")
        assert "content hash does not match" in str(err.value) and f"{name}.pt" in str(err.value), name
    # a mapping passed in (as the trainer's resume does) is checked too
    copy = torch.load(path, weights_only=True)
    copy["state_dict"]["decoder.net.0.bias"].mul_(2)
    with pytest.raises(CheckpointReadError, match="content hash does not match"):
        load_reference_checkpoint(copy)


def test_a_checkpoint_without_a_hash_loads_with_a_note(saved, tmp_path):
    path, model = saved
    obj = torch.load(path, weights_only=True)
    del obj["content_sha256"]
    torch.save(obj, tmp_path / "old.pt")
    ref = load_reference_checkpoint(tmp_path / "old.pt")
    assert ref.content_sha256 is None and ref.integrity.startswith("content hash: not recorded")
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.model.state_dict().items()):
        assert torch.equal(a, b), k
    prov = load_model(tmp_path / "old.pt").provenance()
    assert "not recorded" in prov["checkpoint_integrity"]
    prov = load_model(path).provenance()
    assert prov["checkpoint_integrity"] == f"content hash: verified (sha256 {obj_hash(path)})"


def obj_hash(path):
    return torch.load(path, weights_only=True)["content_sha256"]


def test_content_hash_is_canonical_and_sensitive():
    from latentdiag.models.checkpoint import content_hash

    base = {"model": {"name": "m", "kwargs": {"a": 1, "b": [1, 2]}},
            "state_dict": {"x": torch.arange(6.0).reshape(2, 3), "y": torch.ones(2, dtype=torch.int64)},
            "data": None, "training": {"optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}}, "epoch": 2}}
    h = content_hash(base)
    reordered = {"training": base["training"], "data": None,
                 "state_dict": {"y": base["state_dict"]["y"], "x": base["state_dict"]["x"]},
                 "model": {"kwargs": {"b": [1, 2], "a": 1}, "name": "m"}}
    assert content_hash(reordered) == h                          # key order does not matter
    assert content_hash({**base, "state_dict": {**base["state_dict"], "x": base["state_dict"]["x"].t()
                                                 .contiguous().t()}}) == h   # nor the memory layout
    assert content_hash({**base, "content_sha256": "x", "latentdiag_version": "9"}) == h  # nor uncovered keys
    changed = [
        {**base, "state_dict": {**base["state_dict"], "x": base["state_dict"]["x"].reshape(3, 2)}},     # shape
        {**base, "state_dict": {**base["state_dict"], "y": base["state_dict"]["y"].view(torch.float64)}},  # dtype
        {**base, "state_dict": {**base["state_dict"], "z": torch.zeros(0)}},                            # a key
        {**base, "model": {"name": "m", "kwargs": {"a": True, "b": [1, 2]}}},                          # 1 vs True
        {**base, "model": {"name": "m", "kwargs": {"a": 1.0, "b": [1, 2]}}},                           # 1 vs 1.0
        {**base, "model": {"name": "m", "kwargs": {"a": 1, "b": (1, 2)}}},                             # list/tuple
        {**base, "training": {**base["training"], "epoch": 3}},
        {**base, "training": {"optimizer": {"state": {0: {"exp_avg": torch.tensor([0.0, 0.0, 1e-30])}}},
                              "epoch": 2}},
        {**base, "data": {"name": "mnist5k"}},
    ]
    hashes = {content_hash(c) for c in changed}
    assert h not in hashes and len(hashes) == len(changed)


def _fuzz(path, tmp_path, offsets, bits=(0, 3, 7)):
    """Flip one bit at each offset; load through load_reference_checkpoint. Returns outcome counts and the
    offsets whose flip was accepted."""
    raw = path.read_bytes()
    reference = torch.load(path, weights_only=True)
    target = tmp_path / "fuzz.pt"
    counts = {"refused_crc": 0, "refused_other_clear": 0, "accepted_identical": 0}
    accepted = []
    for offset in offsets:
        for bit in bits:
            data = bytearray(raw)
            data[offset] ^= 1 << bit
            target.write_bytes(bytes(data))
            try:
                ref = load_reference_checkpoint(target)
            except (CheckpointReadError, UnsafeCheckpointError) as err:
                assert "fuzz.pt" in str(err)
                counts["refused_crc" if "CRC-32" in str(err) else "refused_other_clear"] += 1
                continue
            # an accepted flip must be harmless: same weights, same configuration
            state = ref.model.state_dict()
            assert all(torch.equal(state[k], v) for k, v in reference["state_dict"].items()), (offset, bit)
            assert ref.config == reference["model"], (offset, bit)
            counts["accepted_identical"] += 1
            accepted.append((offset, bit))
    return counts, accepted


def test_single_bit_flips_are_refused_or_harmless(saved, tmp_path):
    path, _ = saved
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()

    def data_start(i):  # the local header's own name and extra lengths (torch pads the local extra field)
        name_len, extra_len = struct.unpack("<HH", raw[i.header_offset + 26:i.header_offset + 30])
        return i.header_offset + 30 + name_len + extra_len

    spans = [(data_start(i), data_start(i) + i.file_size, i) for i in infos]
    assert sum("/data/" in i.filename for i in infos) >= 4
    # the pickle every 5th byte, every tensor's data every 29th, a stride over headers and central directory
    inside = sorted({o for a, b, i in spans for o in range(a, b, 5 if i.filename.endswith("data.pkl") else 29)})
    outside = sorted({o for o in range(0, len(raw), 7) if not any(a <= o < b for a, b, _ in spans)})
    counts, accepted = _fuzz(path, tmp_path, inside, bits=(0, 6))
    assert counts["accepted_identical"] == 0, accepted            # any flip inside a member is caught
    assert counts["refused_crc"] == 2 * len(inside)
    counts, accepted = _fuzz(path, tmp_path, outside, bits=(0, 5))
    assert sum(counts.values()) == 2 * len(outside)
    assert counts["refused_crc"] + counts["refused_other_clear"] > len(outside) // 2
