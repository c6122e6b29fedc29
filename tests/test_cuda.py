"""Every guarantee on a CUDA GPU (skipped, not faked, without one: scripts/gpu_check.sh runs them
on a GPU machine). The CPU runs of the same guarantees are the rest of the suite; here each is
checked on the device, and where the CPU gives the reference (a RigL selection, a checkpoint),
against it."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device here: these tests run on a GPU machine (scripts/gpu_check.sh OUTDIR)",
)
DEVICE = "cuda"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv2(x)).mean((2, 3))
        return self.fc2(F.relu(self.fc1(x)))


def _batch(n: int = 8, device: str = DEVICE) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    return torch.randn(n, 3, 16, 16, generator=generator).to(device), torch.randint(0, 10, (n,), generator=generator).to(device)


def _sparse(density: float = 0.2, **kwargs) -> fxsparse.SparseGraphModule:
    torch.manual_seed(0)
    return fxsparse.sparsify(Net(), density, seed=1, **kwargs).to(DEVICE)


def _counts_exact(sparse) -> None:
    for fqn, mask in sparse.masks.items():
        assert mask.device.type == "cuda", fqn
        assert int(mask.sum()) == sparse._fxsparse.sites[fqn].active, fqn
    sparse.verify()


def _train(sparse, method: str, steps: int = 6, autocast: torch.dtype | None = None, scaler=None) -> list[float]:
    opt = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
    kwargs = {"density": 0.5} if method == "pruning" else {}
    scheduler = fxsparse.RigLScheduler(sparse, opt, steps, delta_t=2, end_fraction=1.0, method=method,
                                       scaler=scaler, **kwargs)
    x, y = _batch()
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=autocast, enabled=autocast is not None):
            loss = F.cross_entropy(sparse(x), y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scheduler.step():
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_budgets_are_exact_after_sparsify_and_after_updates():
    sparse = _sparse()
    _counts_exact(sparse)
    _train(sparse, "rigl")
    assert int(sparse.get_buffer("fxsparse_updates")) > 0
    _counts_exact(sparse)


def test_inactive_weights_are_inert_on_every_edit_path():
    sparse = _sparse()
    x, y = _batch()
    reference = sparse(x).detach()
    with torch.no_grad():
        for fqn, weight in sparse.sparse_weights.items():
            weight.data[~sparse.masks[fqn]] = 1e3  # an edit through .data
    torch.testing.assert_close(sparse(x), reference)
    F.cross_entropy(sparse(x), y).backward()
    for fqn, weight in sparse.sparse_weights.items():
        assert not weight.grad[~sparse.masks[fqn]].any(), fqn


def test_density_one_is_the_model():
    torch.manual_seed(0)
    model = Net().to(DEVICE)
    sparse = fxsparse.sparsify(model, 1.0)
    x, _ = _batch()
    torch.testing.assert_close(sparse(x), model(x))


def test_a_rigl_update_on_cuda_selects_what_the_cpu_selects_from_the_same_tensors():
    # growth tensors with many ties: one total order (score, then flat index) on every device
    cpu = fxsparse.sparsify(Net(), 0.2, seed=1)
    gpu = copy.deepcopy(cpu).to(DEVICE)
    generator = torch.Generator().manual_seed(0)
    grow = {fqn: torch.randint(0, 3, mask.shape, generator=generator).float() for fqn, mask in cpu.masks.items()}
    cpu.rigl_step(0.3, grow_from=grow)
    gpu.rigl_step(0.3, grow_from={fqn: g.to(DEVICE) for fqn, g in grow.items()})
    for fqn, mask in cpu.masks.items():
        assert torch.equal(mask, gpu.masks[fqn].cpu()), fqn


@pytest.mark.parametrize("method", ["set", "rigl", "snfs", "pruning"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_methods_train_under_mixed_precision(method, precision):
    sparse = _sparse(1.0 if method == "pruning" else 0.2)  # pruning starts dense
    if precision == "bf16":
        losses = _train(sparse, method, autocast=torch.bfloat16)
    else:
        losses = _train(sparse, method, autocast=torch.float16, scaler=torch.amp.GradScaler("cuda"))
    assert all(torch.isfinite(torch.tensor(losses)))
    _counts_exact(sparse)


def test_torch_compile_computes_what_eager_computes():
    sparse = _sparse().eval()
    x, _ = _batch()
    compiled = torch.compile(sparse)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), sparse(x), rtol=1e-4, atol=1e-4)


def test_the_compact_layout_on_cuda_trains_as_the_masked_layout_decides():
    torch.manual_seed(0)
    x, y = _batch()
    masked = _sparse(0.2)
    compact = _sparse(0.2, layout={"*": "compact"})
    assert any(c.layout == "compact" for c in compact.layouts.values())
    for module in (masked, compact):
        _train(module, "rigl")
    for fqn, mask in masked.masks.items():
        assert torch.equal(mask, compact.masks[fqn]), fqn


def test_export_inference_on_cuda():
    sparse = _sparse().eval()
    x, _ = _batch()
    exported = fxsparse.export_inference(sparse, x)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), sparse(x), rtol=1e-3, atol=1e-4)


def test_a_checkpoint_saved_on_cuda_loads_on_the_cpu_and_back():
    sparse = _sparse()
    _train(sparse, "rigl")
    buffer = io.BytesIO()
    torch.save(sparse.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, map_location="cpu", weights_only=True)
    cpu = fxsparse.sparsify(Net(), 0.2, seed=7)
    cpu.load_state_dict(state)
    for fqn, mask in sparse.masks.items():
        assert torch.equal(cpu.masks[fqn], mask.cpu()), fqn
    back = cpu.to(DEVICE)
    x, _ = _batch()
    sparse.eval(), back.eval()
    torch.testing.assert_close(back(x), sparse(x))


def test_the_trainer_callback_trains_a_sparse_decoder_on_cuda(tmp_path):
    transformers = pytest.importorskip("transformers")
    from fxsparse.integrations.transformers import SparseTrainingCallback

    vocab = 61
    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, use_cache=False)
    torch.manual_seed(0)
    ids = torch.randint(1, vocab, (16, 12))
    rows = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i.clone()} for i in ids]
    sparse = fxsparse.sparsify(transformers.AutoModelForCausalLM.from_config(config), 0.2,
                               example_inputs=torch.utils.data.default_collate(rows[:4]))
    callback = SparseTrainingCallback(delta_t=2, end_fraction=1.0)
    args = transformers.TrainingArguments(str(tmp_path), max_steps=6, per_device_train_batch_size=4, report_to="none",
                                          learning_rate=3e-3, seed=0, disable_tqdm=True, save_strategy="no", bf16=True)
    transformers.Trainer(model=sparse, args=args, train_dataset=rows, callbacks=[callback]).train()
    assert next(sparse.parameters()).device.type == "cuda"
    assert [r["step"] for r in callback.scheduler.history] == [2, 4, 6]
    _counts_exact(sparse)
