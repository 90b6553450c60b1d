"""Activation sources and the shuffling, resumable loader."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sparse_sae.training.data import ActivationLoader, NpySource, TensorSource, open_source


def _rows(n, d=5, start=0):
    """Row ``i`` is ``[i, i, ...]``: a row's origin is visible after shuffling."""
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].expand(n, d).contiguous()


def test_sources_read_the_same_rows(tmp_path):
    full = _rows(23)
    np.save(tmp_path / "a.npy", full[:10].numpy())
    np.save(tmp_path / "b.npy", full[10:].numpy().astype(np.float16))
    shards = tmp_path / "shards"
    shards.mkdir()
    save_file({"activations": full[:7]}, str(shards / "000.safetensors"))
    save_file({"activations": full[7:]}, str(shards / "001.safetensors"))
    for src in (TensorSource(full), NpySource([tmp_path / "a.npy", tmp_path / "b.npy"]), open_source(shards),
                open_source(tmp_path)):
        assert (src.n_rows, src.d) == (23, 5)
        torch.testing.assert_close(src.rows(3, 19), full[3:19])
        torch.testing.assert_close(src.rows(0, 23), full)
    assert isinstance(open_source(tmp_path / "a.npy"), NpySource)


def test_bad_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        open_source(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no .safetensors shards and no .npy"):
        open_source(tmp_path)
    ragged = tmp_path / "ragged"
    ragged.mkdir()
    save_file({"x": torch.zeros(4, 5)}, str(ragged / "0.safetensors"))
    save_file({"x": torch.zeros(4, 6)}, str(ragged / "1.safetensors"))
    with pytest.raises(ValueError, match="ragged activation data.*1.safetensors has width 6"):
        open_source(ragged)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    save_file({"x": torch.zeros(4, 5)}, str(corrupt / "0.safetensors"))
    raw = (corrupt / "0.safetensors").read_bytes()
    (corrupt / "1.safetensors").write_bytes(raw[:-7])
    with pytest.raises(ValueError, match="corrupt shard .*1.safetensors.*truncated"):
        open_source(corrupt)
    (corrupt / "1.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(ValueError, match="corrupt shard .*unreadable header"):
        open_source(corrupt)
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable .npy"):
        open_source(tmp_path / "bad.npy")
    np.save(tmp_path / "3d.npy", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="2-D float array"):
        open_source(tmp_path / "3d.npy")
    with pytest.raises(TypeError, match="data must be"):
        open_source(42)


def test_loader_covers_each_epoch_within_budget_and_resumes():
    src = TensorSource(_rows(1000, d=8))
    loader = ActivationLoader(src, 64, seed=3, memory_budget_mb=200 * 8 * 4 / 2**20)
    assert loader.buffer_rows == 200
    seen = torch.cat([loader.next_batch() for _ in range(1000 // 64 + 1)])[:1000, 0]
    assert sorted(seen.tolist()) == list(range(1000))        # each row once per epoch
    assert not torch.equal(seen, torch.arange(1000.0))       # shuffled
    state = loader.state_dict()
    after = [loader.next_batch() for _ in range(20)]
    again = ActivationLoader(src, 64, seed=3, memory_budget_mb=200 * 8 * 4 / 2**20)
    again.load_state_dict(state)
    for a in after:
        assert torch.equal(a, again.next_batch())
    with pytest.raises(ValueError, match="batch_size"):
        ActivationLoader(src, 32, seed=3).load_state_dict(state)


def test_ranks_split_the_global_batch():
    src = TensorSource(_rows(300, d=3))
    whole = ActivationLoader(src, 40, seed=1).next_batch()
    parts = [ActivationLoader(src, 40, seed=1, rank=r, world_size=2).next_batch() for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)
    with pytest.raises(ValueError, match="divisible"):
        ActivationLoader(src, 41, world_size=2)
