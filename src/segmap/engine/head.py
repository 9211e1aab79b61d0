"""The segmentation head (a network's last convolution) split off a TorchScript graph, to run in fp32.

Used by every reduced-precision path (torch autocast in :mod:`.precision`, OpenVINO bf16 in
:mod:`.openvino_runtime`): see :class:`Fp32Head` for why the head must stay in fp32.
"""

from __future__ import annotations

import logging
import warnings

import torch

log = logging.getLogger("segmap.engine")


class Fp32Head:
    """A network whose last convolution (the segmentation head) runs in fp32 whatever autocast is in force.

    Why: a head's logits are sums of many products of similar size that largely cancel, most of all in
    region-based models, whose heads are differences of class logits (a region is "logit > 0"). Rounding the
    head's inputs and weights to bf16 (8-bit mantissa) moved region voxels across 0: on the region-based fidelity
    case, Dice 0.989 with everything in bf16, 0.996 with the head alone in fp32 (and 0.998 with the last decoder
    stage too, which costs real time on large networks). The head is a 1x1x1 convolution over the last decoder
    stage's features, a negligible share of the network's work.
    """

    def __init__(self, body, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
                 groups: int):
        self.body, self.weight, self.bias = body, weight, bias
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body(x)
        with torch.autocast(features.device.type, enabled=False):
            return torch.convolution(features.float(), self.weight, self.bias, self.stride, self.padding,
                                     self.dilation, False, [0] * len(self.stride), self.groups)


def _attribute_path(value) -> list[str] | None:
    """``["decoder", "seg_layers", "1", "weight"]`` for a graph value read from module attributes, else None."""
    names = []
    while value.node().kind() == "prim::GetAttr":
        names.append(value.node().s("name"))
        value = value.node().input()
    if value.node().kind() != "prim::Param":
        return None
    return names[::-1]


def _tensor(module, value) -> torch.Tensor | None:
    """The tensor a graph value holds: a constant (frozen graphs) or a module attribute; else None."""
    if value.node().kind() == "prim::Constant":
        v = value.toIValue()
    else:
        path = _attribute_path(value)
        if path is None:
            return None
        v = module
        for name in path:
            v = getattr(v, name)
    return v.detach().float() if isinstance(v, torch.Tensor) else None


def _int_list(value) -> list | None:
    """The constant int list a graph value holds (a list constant or a list built from constants), else None."""
    if value.node().kind() == "prim::Constant":
        v = value.toIValue()
        return list(v) if isinstance(v, (list, tuple)) else None
    if value.node().kind() == "prim::ListConstruct":
        return [c.toIValue() if c.node().kind() == "prim::Constant" else None for c in value.node().inputs()]
    return None


def fp32_head(network) -> Fp32Head | None:
    """``network`` split before its last convolution, that convolution to run in fp32 (:class:`Fp32Head`), or
    None where the graph does not end in one plain convolution of module weights (the network then runs as it is).

    TorchScript graphs cannot be told to leave one operation out of autocast, so a copy of the network's graph is
    cut to return the head's input, and the head runs from Python with its own weights. The copy is a frozen one
    (weights as constants, own graph): 0.03 s on a 31 M-parameter network where a save/load copy took 1.4 s, and
    the same bf16 time per tile.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            body = torch.jit.freeze(network.eval())
        graph = body.graph
        torch._C._jit_pass_inline(graph)
        outputs = list(graph.outputs())
        if len(outputs) != 1 or outputs[0].node().kind() != "aten::_convolution":
            return None
        conv = outputs[0].node()
        inputs = list(conv.inputs())
        weight, bias = _tensor(body, inputs[1]), _tensor(body, inputs[2])
        if weight is None or inputs[6].toIValue() is not False:  # not a plain (non-transposed) convolution
            return None
        if bias is None and inputs[2].node().kind() != "prim::Constant":
            return None  # a bias computed in the graph: not one we can read
        params = [_int_list(inputs[i]) for i in (3, 4, 5)]
        groups = inputs[8].toIValue()
        if any(not p or None in p for p in params) or not isinstance(groups, int):
            return None

        graph.eraseOutput(0)
        graph.registerOutput(inputs[0])
        torch._C._jit_pass_dce(graph)
        return Fp32Head(body, weight, bias, *params, groups)
    except Exception as e:  # an unusual graph: the fast path then runs it whole
        log.debug("segmentation head not split off for fp32: %s", e)
        return None
