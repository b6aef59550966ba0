"""Random-weight ONNX conv nets shaped like the real ones, for schedule benchmarks (not tests)."""
from __future__ import annotations

import numpy as np
import onnx

from tvmzoo.io.onnx_graph import GraphBuilder

# RepVGG-A0 deploy form: (out channels, number of blocks) per stage; stride 2 at each stage's block 0.
A0_STAGES = [(48, 1), (48, 2), (96, 4), (192, 14), (1280, 1)]


def _he(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def repvgg_a0_onnx(size: int = 224, batch: int = 1, classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """22 conv3x3+ReLU with the A0 widths, GAP, Gemm."""
    rng = np.random.default_rng(seed)
    g = GraphBuilder("repvgg_a0_random")
    x = g.input([batch, 3, size, size])
    cin = 3
    for si, (cout, blocks) in enumerate(A0_STAGES):
        for bi in range(blocks):
            x = g.relu(g.conv(x, _he(rng, (cout, cin, 3, 3)), rng.standard_normal(cout) * 0.1,
                              f"s{si}b{bi}", stride=2 if bi == 0 else 1))
            cin = cout
    x = g.flatten(g.global_avg_pool(x))
    x = g.gemm(x, _he(rng, (classes, cin)), rng.standard_normal(classes) * 0.1, "fc")
    g.output(x, [batch, classes])
    return g.build()


# EfficientNet-Lite0 MBConv stages: (expand ratio, kernel, stride, out channels, repeats); no SE, ReLU6.
LITE0_STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


def efficientnet_lite0_onnx(size: int = 224, batch: int = 1, classes: int = 1000,
                            seed: int = 0) -> onnx.ModelProto:
    """Lite0-shaped: stem conv3x3/2, 16 MBConv blocks (1x1 expand, depthwise kxk, 1x1 project), head."""
    rng = np.random.default_rng(seed)
    g = GraphBuilder("efficientnet_lite0_random")
    bias = lambda c: (rng.standard_normal(c) * 0.1).astype(np.float32)  # noqa: E731
    x = g.relu6(g.conv(g.input([batch, 3, size, size]), _he(rng, (32, 3, 3, 3)), bias(32), "stem", stride=2))
    cin = 32
    for si, (expand, k, stride, cout, repeats) in enumerate(LITE0_STAGES):
        for bi in range(repeats):
            s = stride if bi == 0 else 1
            mid = cin * expand
            h = x
            if expand != 1:
                h = g.relu6(g.conv(h, _he(rng, (mid, cin, 1, 1)), bias(mid), f"s{si}b{bi}.expand"))
            h = g.relu6(g.conv(h, _he(rng, (mid, 1, k, k)), bias(mid), f"s{si}b{bi}.dw", stride=s, groups=mid))
            h = g.conv(h, _he(rng, (cout, mid, 1, 1)) * 0.5, bias(cout), f"s{si}b{bi}.project")
            x = g.add(x, h) if (s == 1 and cin == cout) else h
            cin = cout
    x = g.relu6(g.conv(x, _he(rng, (1280, cin, 1, 1)), bias(1280), "head"))
    x = g.flatten(g.global_avg_pool(x))
    x = g.gemm(x, _he(rng, (classes, 1280)), bias(classes), "fc")
    g.output(x, [batch, classes])
    return g.build()
