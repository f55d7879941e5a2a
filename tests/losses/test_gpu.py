"""On a CUDA device: losses and diagnostics updates launch no host sync; results match CPU."""

from __future__ import annotations

import pytest
import torch

from mhpo.diagnostics import DiagnosticsAccumulator
from mhpo.losses import LOSSES, get_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def cpu_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(16, 256, generator=g) * 0.5 - 1.5
    return {
        "logp": logp,
        "old_logp": logp + torch.randn(16, 256, generator=g) * 0.3,
        "advantages": torch.randn(16, generator=g),
        "mask": torch.rand(16, 256, generator=g) > 0.2,
    }


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_no_sync_and_same_numbers_as_cpu(name: str) -> None:
    cpu = cpu_batch()
    gpu = {k: v.cuda() for k, v in cpu.items()}
    logp = gpu["logp"].clone().bfloat16().requires_grad_(True)
    acc = DiagnosticsAccumulator(name, {})
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = get_loss(name)(logp, gpu["old_logp"], gpu["advantages"], gpu["mask"])
        out.loss.backward()
        acc.update(**gpu, loss_stats=get_loss(name)(**gpu).stats)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    on_gpu = acc.compute()
    acc_cpu = DiagnosticsAccumulator(name, {})
    acc_cpu.update(**cpu, loss_stats=get_loss(name)(**cpu).stats)
    on_cpu = acc_cpu.compute()
    for key, value in on_cpu.scalars.items():
        assert on_gpu.scalars[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    for key, hist in on_cpu.histograms.items():
        assert sum(on_gpu.histograms[key]["counts"]) == sum(hist["counts"]), key
    assert [o["sample"] for o in on_gpu.outliers] == [o["sample"] for o in on_cpu.outliers]
