"""Tower export to ONNX (torch's dynamo exporter) and onnxruntime sessions over the result."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn


def export_tower(tower: nn.Module, example: torch.Tensor, path: str | Path, input_name: str = "x", output_name: str = "vec") -> Path:
    """Export ``tower: (B, W) int64 -> (B, H, D)`` with a dynamic batch dimension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tower.eval()
    program = torch.onnx.export(
        tower,
        (example,),
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        input_names=[input_name],
        output_names=[output_name],
        verbose=False,
    )
    program.save(str(path))
    return path


def session(path: str | Path, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
