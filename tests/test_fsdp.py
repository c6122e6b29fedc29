"""FSDP2 (``fully_shard`` per block and on the root) on 2 CPU processes (gloo), against one process
with the same global batch: every method makes the same masks and weights (float64, so that
rounding cannot flip a choice; bf16 autocast to its precision), with ``reshard_after_forward``
True and False, gradient accumulation without gradient sync and activation checkpointing; masks are sharded like their
weights and every shard holds exact zeros at its inactive positions after every step; a
``torch.distributed.checkpoint`` saved at 2 ranks loads at 1 rank and into a plain sparse
module, and back, and a resume from it is exact."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fxsparse
from fxsparse.sharding import is_sharded
from gloo import free_port, init

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")

STEPS, DELTA_T, BATCH = 8, 2, 8
CASES = {  # name: (method, scheduler kwargs, reshard_after_forward, micro-batches, bf16 autocast)
    "rigl": ("rigl", {}, True, 1, False),
    "rigl no reshard": ("rigl", {}, False, 1, False),
    "rigl accumulate": ("rigl", {}, True, 2, False),
    "rigl bf16": ("rigl", {}, True, 1, True),
    "rigl checkpointed": ("rigl", {}, True, 1, False),  # activation checkpointing of every block
    "rigl unkept": ("rigl", {}, True, 1, False),  # no keep_blocks(): fully_shard on the inlined containers
    "set": ("set", {}, True, 1, False),
    "snfs": ("snfs", {}, True, 1, False),
    "rigl-sg": ("rigl-sg", {}, True, 1, False),
    "rigl-sm": ("rigl-sm", {}, True, 1, False),
    "static": ("static", {}, True, 1, False),
    "pruning": ("pruning", {"density": 0.2}, True, 1, False),
}


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)
        self.fc1 = torch.nn.Linear(8, 17)  # 17 rows: not divisible by 2 ranks
        self.fc2 = torch.nn.Linear(17, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(4, 8)
        self.layers = torch.nn.ModuleList([Block() for _ in range(3)])
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _dtype(case: str) -> torch.dtype:
    return torch.float32 if CASES[case][4] else torch.float64


def _sparse(case: str) -> fxsparse.SparseGraphModule:
    torch.manual_seed(0)
    method = CASES[case][0]
    sparse = fxsparse.sparsify(Net().to(_dtype(case)), 1.0 if method == "pruning" else 0.4, "erk", seed=3)
    if "unkept" in case:  # the first forward under fully_shard keeps the blocks it wrapped
        return sparse
    assert sparse.keep_blocks() == ["layers.0", "layers.1", "layers.2"]
    if "checkpointed" in case:  # the blocks' activations recomputed in the backward, FSDP gathering again
        sparse.gradient_checkpointing_enable()
        assert sparse.is_gradient_checkpointing
    return sparse


def _shard(sparse: fxsparse.SparseGraphModule, reshard: bool = True) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in sparse.layers:  # the FSDP2 recipe: each block, then the root
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(sparse, mesh=mesh, reshard_after_forward=reshard)
    if not sparse.kept_blocks:  # kept at the first forward, in place: FSDP's wrapping stays
        sparse(torch.zeros(1, 4, dtype=sparse.get_parameter("head.weight").dtype))
        assert sparse.kept_blocks == ["layers.0", "layers.1", "layers.2"]
        assert type(sparse.layers[0]).__name__ == "FSDPBlock" and sparse.layers[0].block_path == "layers.0"


def _data(case: str, steps: int = STEPS):
    gen = torch.Generator().manual_seed(7)
    micro = CASES[case][3]
    return [[(torch.randn(BATCH, 4, generator=gen, dtype=_dtype(case)), torch.randint(0, 5, (BATCH,), generator=gen))
             for _ in range(micro)] for _ in range(steps)]


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if is_sharded(tensor) else tensor).detach().clone()


def _check_shards(sparse: fxsparse.SparseGraphModule, grads: bool) -> None:
    """Per shard: the mask is this rank's rows only, and inactive entries (of the gradient) are zero."""
    for fqn, mask in sparse.masks.items():
        weight = sparse.get_parameter(fqn)
        assert is_sharded(mask) and is_sharded(weight), fqn
        assert mask.placements == weight.placements and mask._local_tensor.shape == weight._local_tensor.shape, fqn
        local = (weight.grad if grads else weight)._local_tensor
        assert bool(local[~mask._local_tensor].eq(0).all()), (fqn, "grad" if grads else "weight")


def _train(case: str, rank: int = 0, world: int = 1, steps: int = STEPS, load=None, save=None):
    method, kwargs, reshard, micro, bf16 = CASES[case]
    sparse = _sparse(case)
    if world > 1:
        _shard(sparse, reshard)
    optimizer = torch.optim.Adam(sparse.parameters(), lr=0.01)
    scheduler = fxsparse.RigLScheduler(sparse, optimizer, STEPS, delta_t=DELTA_T, end_fraction=1.0, method=method, **kwargs)
    if load is not None:
        fxsparse.dcp.load(load, sparse, optimizer, scheduler)
    share = BATCH // world
    # bf16 rounds each rank's weight gradient (a sum over its half of the batch) before the ranks'
    # average: one process computes the halves as two micro-batches to round the same sums
    halves = 2 if bf16 and world == 1 else 1
    for batches in _data(case)[scheduler.step_count: scheduler.step_count + steps]:
        for i, (x, y) in enumerate(batches):
            if world > 1:
                sparse.set_requires_gradient_sync(i == len(batches) - 1)  # accumulate without sync
            x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
            for part in range(halves):
                rows = slice(part * len(x) // halves, (part + 1) * len(x) // halves)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = torch.nn.functional.cross_entropy(sparse(x[rows]), y[rows]) / (len(batches) * halves)
                loss.backward()
        if world > 1:
            _check_shards(sparse, grads=True)
        if scheduler.step():
            optimizer.step()
        optimizer.zero_grad()
        if world > 1:
            _check_shards(sparse, grads=False)
    sparse.verify()  # sharded: each rank checks its shards, counts summed over the ranks
    if save is not None:
        fxsparse.dcp.save(save, sparse, optimizer, scheduler)
    return sparse, optimizer, scheduler


def _result(sparse, scheduler):
    return {"masks": {f: _full(m) for f, m in sparse.masks.items()},
            "weights": {f: _full(sparse.get_parameter(f)) for f in sparse.masks},
            "updates": len(scheduler.history), "density": sparse.density}


def _methods_worker(rank: int, world: int, port: int, out: str) -> None:
    init(rank, world, port)
    try:
        results = {}
        for case in CASES:
            sparse, _, scheduler = _train(case, rank, world)
            results[case] = _result(sparse, scheduler)
        if rank == 0:
            torch.save(results, os.path.join(out, "methods.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_every_method_makes_the_one_process_topology_under_fully_shard(tmp_path):
    mp.spawn(_methods_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "methods.pt")
    for case, (method, *_rest) in CASES.items():
        single_module, _, single_scheduler = _train(case)
        single = _result(single_module, single_scheduler)
        assert sharded[case]["updates"] == single["updates"] == (0 if method == "static" else 4), case
        assert sharded[case]["density"] == single["density"], case
        moved = False
        for fqn, mask in single["masks"].items():
            assert torch.equal(sharded[case]["masks"][fqn], mask), (case, fqn)
            # bf16: the same roundings, summed in another order in float32 (Adam normalizes the difference)
            tolerance = {"rtol": 1e-3, "atol": 5e-5} if CASES[case][4] else {"rtol": 1e-7, "atol": 1e-10}
            torch.testing.assert_close(sharded[case]["weights"][fqn], single["weights"][fqn], **tolerance)
            moved |= not torch.equal(mask, _sparse(case).masks[fqn])
        assert moved or method == "static", f"{case}: the topology never changed, the test would prove nothing"


def _llama():
    import tiny_transformers

    return tiny_transformers.llama().double()


def _vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=5).double()


MODELS = {"llama": (_llama, ["model.layers.0", "model.layers.1"]), "vit": (_vit, ["blocks.0", "blocks.1"])}


def _model_batches(name: str):
    gen = torch.Generator().manual_seed(11)
    if name == "llama":
        import tiny_transformers

        return [torch.randint(1, tiny_transformers.VOCAB, (4, 12), generator=gen) for _ in range(4)]
    return [(torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64), torch.randint(0, 5, (4,), generator=gen)) for _ in range(4)]


def _model_loss(name: str, sparse, batch, rank: int, world: int) -> torch.Tensor:
    share = 4 // world
    if name == "llama":
        ids = batch[rank * share:(rank + 1) * share]
        logits = sparse(ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    x, y = batch[0][rank * share:(rank + 1) * share], batch[1][rank * share:(rank + 1) * share]
    return torch.nn.functional.cross_entropy(sparse(x), y)


def _train_model(name: str, rank: int = 0, world: int = 1):
    build, blocks = MODELS[name]
    batches = _model_batches(name)
    example = (batches[0][:1],) if name == "llama" else None
    sparse = fxsparse.sparsify(build(), 0.3, "erk", seed=5, example_inputs=example)
    assert sparse.keep_blocks() == blocks
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for path in blocks:
            fully_shard(sparse.get_submodule(path), mesh=mesh)
        fully_shard(sparse, mesh=mesh)
    optimizer = torch.optim.AdamW(sparse.parameters(), lr=0.01)
    scheduler = fxsparse.RigLScheduler(sparse, optimizer, 4, delta_t=2, end_fraction=1.0)
    for batch in batches:
        _model_loss(name, sparse, batch, rank, world).backward()
        if scheduler.step():
            optimizer.step()
        optimizer.zero_grad()
    sparse.eval()  # the eval graph (an exported module has one per mode), blocks and all
    with torch.no_grad():
        loss = _model_loss(name, sparse, batches[0], rank, world).detach().reshape(1)
    if world > 1:  # the mean of the ranks' equal halves: the whole batch's loss
        dist.all_reduce(loss)
        loss /= world
    sparse.eval_loss = float(loss)
    return sparse, scheduler


def _models_worker(rank: int, world: int, port: int, out: str) -> None:
    init(rank, world, port)
    try:
        results = {}
        for name in MODELS:
            sparse, scheduler = _train_model(name, rank, world)
            results[name] = {**_result(sparse, scheduler), "eval_loss": sparse.eval_loss}
        if rank == 0:
            torch.save(results, os.path.join(out, "models.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_transformer_from_a_config_and_a_timm_vit_train_with_rigl_sharded_per_block(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("timm")
    mp.spawn(_models_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "models.pt")
    for name in MODELS:
        module, scheduler = _train_model(name)
        single = _result(module, scheduler)
        assert sharded[name]["updates"] == single["updates"] == 2, name
        assert module._fxsparse.mode_graphs or name == "vit"  # the exported Llama switches graphs under FSDP
        assert abs(sharded[name]["eval_loss"] - module.eval_loss) < 1e-9, name
        for fqn, mask in single["masks"].items():
            assert torch.equal(sharded[name]["masks"][fqn], mask), (name, fqn)
            torch.testing.assert_close(sharded[name]["weights"][fqn], single["weights"][fqn], rtol=1e-7, atol=1e-10)


def _checkpoint_worker(rank: int, world: int, port: int, out: str, case: str, load: str | None, save: str | None) -> None:
    init(rank, world, port)
    try:
        sparse, _, scheduler = _train(case, rank, world, steps=4, load=load, save=save)
        result = _result(sparse, scheduler)  # a collective: every rank gathers
        if rank == 0:
            torch.save(result, os.path.join(out, f"{case} {'resumed' if load else 'saved'}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _same(a, b, exact: bool = False) -> None:
    assert a["updates"] == b["updates"]
    for fqn in a["masks"]:
        assert torch.equal(a["masks"][fqn], b["masks"][fqn]), fqn
        if exact:
            assert torch.equal(a["weights"][fqn], b["weights"][fqn]), fqn
        else:
            torch.testing.assert_close(a["weights"][fqn], b["weights"][fqn], rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("case", ["rigl", "snfs"])
def test_a_sharded_checkpoint_loads_at_one_rank_and_back_and_resumes_exactly(tmp_path, case):
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    # 2 ranks train 4 steps (2 updates) and save
    mp.spawn(_checkpoint_worker, args=(2, free_port(), str(tmp_path), case, None, two), nprocs=2, join=True)
    saved = torch.load(tmp_path / f"{case} saved.pt")
    # one process, no process group: a plain sparse module loads it, bit for bit, and saves it again
    sparse = _sparse(case)
    optimizer = torch.optim.Adam(sparse.parameters(), lr=0.01)
    scheduler = fxsparse.RigLScheduler(sparse, optimizer, STEPS, delta_t=DELTA_T, end_fraction=1.0, method=CASES[case][0])
    fxsparse.dcp.load(two, sparse, optimizer, scheduler)
    assert scheduler.step_count == 4 and not any(is_sharded(m) for m in sparse.masks.values())
    _same(_result(sparse, scheduler), saved, exact=True)
    sparse.verify()
    fxsparse.dcp.save(one, sparse, optimizer, scheduler)
    # resumed at one rank, and at two ranks from the one-rank checkpoint: the uninterrupted run
    uninterrupted = _result(*_train(case)[::2])
    _same(_result(*_train(case, steps=4, load=two)[::2]), uninterrupted)
    mp.spawn(_checkpoint_worker, args=(2, free_port(), str(tmp_path), case, one, None), nprocs=2, join=True)
    _same(torch.load(tmp_path / f"{case} resumed.pt"), uninterrupted)


def _refusals_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    init(rank, world, port)
    messages = {}
    try:
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        compact = fxsparse.sparsify(Net(), 0.4, "erk", layout={"head.weight": "compact"})
        fully_shard(compact, mesh=mesh)
        try:
            compact(torch.randn(2, 4))
            messages["compact"] = None
        except ValueError as error:
            messages["compact"] = str(error)
        from test_kernels import Net as StandardizedNet  # a weight-standardized convolution
        from test_kernels import X

        standardized = fxsparse.sparsify(StandardizedNet(), 0.4, "uniform", dense=[], example_inputs=X)
        fully_shard(standardized, mesh=mesh)
        try:
            standardized(X)
            messages["kernel"] = None
        except ValueError as error:
            messages["kernel"] = str(error)
        if rank == 0:
            torch.save(messages, os.path.join(out, "refusals.pt"))
    finally:
        dist.destroy_process_group()


def test_what_cannot_run_sharded_is_refused_with_what_to_do(tmp_path):
    mp.spawn(_refusals_worker, args=(1, free_port(), str(tmp_path)), nprocs=1, join=True)
    messages = torch.load(tmp_path / "refusals.pt")
    assert "layout='masked'" in messages["compact"] and "head.weight" in messages["compact"]
    assert "computed from them" in messages["kernel"] and "stem.weight" in messages["kernel"]


def test_lightning_model_parallel_strategy_shards_per_block_and_makes_the_one_process_topology(tmp_path):
    pytest.importorskip("lightning")
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent / "lightning_fsdp.py"
    env = {**os.environ, "PYTHONPATH": str(script.parent.parent)}
    for devices in (2, 1):
        done = subprocess.run([sys.executable, str(script), str(tmp_path), str(devices)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    sharded, single = (torch.load(tmp_path / f"devices{d}.pt") for d in (2, 1))
    assert sharded["sharded"] and not single["sharded"]
    assert [r["step"] for r in sharded["history"]] == [2, 4, 6, 8] and sharded["history"] == single["history"]
    for fqn, mask in single["masks"].items():
        assert torch.equal(sharded["masks"][fqn], mask), fqn
        torch.testing.assert_close(sharded["weights"][fqn], single["weights"][fqn], rtol=1e-7, atol=1e-10)
