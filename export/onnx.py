"""Tower export to ONNX (torch's dynamo exporter) and onnxruntime sessions over the result."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn


def export_module(module: nn.Module, examples: tuple[torch.Tensor, ...], input_names: tuple[str, ...], path: str | Path, output_name: str = "out") -> Path:
    """Export ``module(*examples)`` with every input's first dimension (the batch) dynamic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        module,
        examples,
        dynamo=True,
        dynamic_shapes=tuple({0: batch} for _ in examples),
        input_names=list(input_names),
        output_names=[output_name],
        verbose=False,
    )
    program.save(str(path))
    return path


def export_tower(tower: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """A tower ``(B, W) int64 -> (B, H, D)``: input ``x``, output ``vec``."""
    return export_module(tower, (example,), ("x",), path, "vec")


def session(path: str | Path, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
