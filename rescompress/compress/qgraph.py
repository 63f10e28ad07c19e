"""Reading a converted PT2E graph without importing torchao: is it int8, and in which scheme's layout.
Cheap enough for every checkpoint and export decision, including runs that never quantize."""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

QUANT_OPS = ("quantized_decomposed.quantize_per_tensor", "quantized_decomposed.dequantize_per_channel")


def is_quantized(model: nn.Module) -> bool:
    """True for a converted PT2E model (int8 weights and Q/DQ pairs in its graph)."""
    if not isinstance(model, GraphModule):
        return False
    return any(str(n.target).startswith(QUANT_OPS) for n in model.graph.nodes if n.op == "call_function")


def scheme_of(model: GraphModule) -> str:
    """The int8 scheme a converted model was quantized with, read from its activation quantize ops."""
    acts = [n for n in model.graph.nodes if n.op == "call_function"
            and str(n.target).startswith("quantized_decomposed.quantize_per_tensor")]
    if not acts:
        raise ValueError("the model has no quantized activations")
    if any(n.args[-1] == torch.uint8 for n in acts):
        return "onnxruntime"
    return "tensorrt" if all(n.args[2] == 0 for n in acts) else "tflite"
