"""No file runs code: every loader of fxsparse and its recipes, handed a pickle whose unpickling
would call a function (here ``open(marker, "w")``, which creates a file), refuses it with a clear
error, and the function never runs. The files they should read still load."""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fxsparse
from fxsparse.data import load_cifar, write_cifar
from fxsparse.safe_io import UnsafeFileError, load_arrays_pickle, load_torch

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))


class Payload:
    """Unpickling it calls ``open(marker, "w")``: the marker file appears if any code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "code-ran"


def _malicious(path: Path, marker: Path, wrap=lambda p: {"payload": p}) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(wrap(Payload(marker)), path)
    return path


def test_payload_runs_code_when_unpickled_unsafely(tmp_path, marker):
    # the test's premise: an unsafe load of this file does run code
    path = _malicious(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_load_torch_refuses_and_names_what_was_asked(tmp_path, marker):
    path = _malicious(tmp_path / "evil.pt", marker)
    with pytest.raises(UnsafeFileError, match=r"GLOBAL (builtins|io)\.open") as info:
        load_torch(path, what="checkpoint")
    assert "nothing of it was run" in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()


def test_load_torch_reads_plain_state(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    sparse = fxsparse.sparsify(net, 0.5)
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1, momentum=0.9)
    scheduler = fxsparse.TopologyScheduler(sparse, opt, total_steps=10, delta_t=2, method="snfs")
    for _ in range(4):
        sparse(torch.randn(3, 4)).sum().backward()
        if scheduler.step():
            opt.step()
        opt.zero_grad()
    state = {"scheduler": scheduler.state_dict(), "model": sparse.state_dict(), "opt": opt.state_dict(),
             "rng": torch.get_rng_state()}
    torch.save(state, tmp_path / "ok.pt")
    loaded = load_torch(tmp_path / "ok.pt")
    assert loaded["scheduler"]["step_count"] == 4 and loaded["scheduler"]["history"] == scheduler.history


def test_trainer_callback_refuses_a_malicious_scheduler_state(tmp_path, marker):
    transformers = pytest.importorskip("transformers")
    from fxsparse.integrations.transformers import STATE_FILE, SparseTrainingCallback

    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=31, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16, use_cache=False)
    torch.manual_seed(0)
    ids = torch.randint(1, 31, (8, 6))
    data = [{"input_ids": i, "labels": i} for i in ids]
    sparse = fxsparse.sparsify(transformers.AutoModelForCausalLM.from_config(config), 0.3,
                               example_inputs={"input_ids": ids[:4], "labels": ids[:4]})
    args = transformers.TrainingArguments(str(tmp_path / "out"), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                                          report_to="none", use_cpu=True, disable_tqdm=True)
    transformers.Trainer(model=sparse, args=args, train_dataset=data, callbacks=[SparseTrainingCallback(delta_t=1)]).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    _malicious(checkpoint / STATE_FILE, marker)
    trainer = transformers.Trainer(model=sparse, args=args, train_dataset=data, callbacks=[SparseTrainingCallback(delta_t=1)])
    with pytest.raises(UnsafeFileError, match="topology scheduler"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert not marker.exists()


def test_train_recipe_refuses_a_malicious_checkpoint(tmp_path, marker):
    import train
    path = _malicious(tmp_path / "run" / train.CHECKPOINT, marker,
                      wrap=lambda p: {k: p for k in train._CHECKPOINT_KEYS})
    with pytest.raises(train.CheckpointError, match="UnsafeFileError"):
        train.load_checkpoint(path, train.Config(), torch.device("cpu"))
    assert not marker.exists()


def test_pruning_recipe_refuses_a_malicious_dense_checkpoint(tmp_path, marker):
    pytest.importorskip("transformers")
    import prune_lm as prune
    _malicious(tmp_path / "runs" / "dense-seed0" / prune.train.CHECKPOINT, marker,
               wrap=lambda p: {"config": p, "model": p})
    args = argparse.Namespace(runs_dir=str(tmp_path / "runs"))
    with pytest.raises(UnsafeFileError):
        prune.dense_checkpoint(args, [], 0)
    assert not marker.exists()


def test_cifar_batches_load_and_a_malicious_one_is_refused(tmp_path, marker):
    images = np.random.default_rng(0).integers(0, 256, (10, 3, 32, 32), dtype=np.uint8)
    labels = np.arange(10) % 10
    write_cifar(tmp_path, "cifar10", images, labels, train=False)
    x, y = load_cifar(tmp_path, "cifar10", train=False)
    assert torch.equal(x, torch.from_numpy(images)) and torch.equal(y, torch.from_numpy(labels))
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    with open(batch, "wb") as handle:
        pickle.dump({b"data": Payload(marker), b"labels": [0]}, handle)
    with pytest.raises(UnsafeFileError, match=r"global (builtins|io)\.open"):
        load_cifar(tmp_path, "cifar10", train=False)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_array_unpickler_reads_numpy_arrays(tmp_path, protocol):
    data = {b"data": np.arange(12, dtype=np.uint8).reshape(3, 4), b"labels": [1, 2, 3], b"name": "x"}
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    with open(path, "rb") as handle:
        loaded = load_arrays_pickle(handle)
    assert np.array_equal(loaded[b"data"], data[b"data"]) and loaded[b"labels"] == [1, 2, 3]


def test_no_library_or_recipe_file_unpickles_unsafely():
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("fxsparse", "recipes", "benchmarks", "examples", "scripts"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            if "weights_only=False" in text or "pickle.load(" in text or "pickle.loads(" in text:
                offenders.append(str(path.relative_to(root)))
    assert offenders == [], f"unpickling that can run code in {offenders}: use fxsparse.safe_io"
