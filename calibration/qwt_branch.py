"""QwT (v1) block compensation: one closed-form linear branch per residual block.

For a block with input X and output Y (see :mod:`qwt_deploy.graph.blocks`), QwT fits

    Y_fp - Y_q  ~=  W · X_q + b

by least squares over every calibration sample and every spatial position (or token), where
X_q is the block input on the quantized-and-compensated network, Y_q the quantized block's
output and Y_fp the *full-precision* block run on the same X_q (QwT reference code,
``generate_compensation_model``; methods.md 1.3-1.4). The deployed block output becomes
``Y_q + W·X_q + b``.

Branch form
-----------
- CNN blocks (4-D values): a 1x1 convolution with the block's stride, mapping C_in -> C_out,
  grouped with ``group_channels`` input channels per group (QwT's ResNet code: 64). A 1x1
  conv with stride s reads X at the positions ``X[:, :, ::s, ::s]``, so those are exactly the
  rows the regression uses. Groups must divide both C_in and C_out; we take the largest
  divisor of gcd(C_in, C_out) not above C_in // group_channels.
- Token blocks (3-D ``[B, T, D]`` or 2-D values): a dense D_in x D_out linear map (MatMul).

Closed form
-----------
With A = [X_rows, 1] (per group), we stream G = AᵀA, B = AᵀR, Σ R² and the row count in
float64 over the calibration batches (nothing but (d+1)² + (d+1)·C_out numbers per group is
kept), then solve ``(G + λ·I_W) [W; b] = B``. The ridge λ is relative, ``ridge · n ·
mean_c Var(x_c)``, so one setting works at any activation scale; it does not penalise b.
``ridge = 0`` is plain least squares (``numpy.linalg.lstsq``, tested).

R² = 1 - SS_res / SS_tot with SS_tot around the per-output-channel mean of the target,
summed over all entries (the reference code's definition). A branch is kept only if R² > 0;
otherwise it is zero and is not exported: QwT's rule that a branch may only help.

Branch precision (per target: ``Target.branch_precision``)
-----------------------------------------------------------
- ``--target ort``: FP32. ONNX Runtime's CPU provider has no FP16 Conv/MatMul kernels on
  x86 (it inserts Casts and computes in FP32, measured with ORT 1.32), so FP16 there would
  only add two Casts per branch and rounding, and save nothing but file size.
- ``--target trt``: FP16, as the QwT issue asks. TensorRT 11 networks are strongly typed
  (backends.md §3 rule 7): a layer runs in the type the ONNX graph gives its tensors, so the
  branch is exported as ``Cast(X -> float16) -> Conv/MatMul(FP16 weight [+ FP16 bias]) ->
  Cast(-> float32) -> Add(Y)``: the 1x1 conv / GEMM runs on FP16 tensor cores at half the
  weight bytes, and Y (the INT8 block's float output) is never rounded to FP16.
  ``BranchFit.branch`` computes what those kernels compute: X, W and b rounded to FP16,
  products accumulated in FP32 (the compute type of TensorRT's FP16 tensor-core Conv/GEMM
  kernels), the layer output rounded once to FP16 (a MatMul's bias Add rounds once more, as
  the separate ONNX Add does), then widened to FP32 and added to Y. TensorRT does not promise
  a tactic's accumulation type; an FP16-accumulating tactic would differ by a few FP16 ulps of
  the branch, far below one INT8 output step. A block whose calibration input (or a bound on
  its branch output) comes within 2x of FP16's largest value keeps an FP32 branch
  (:func:`fits_fp16`): an overflow would make the block output inf.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from qwt_deploy.graph.blocks import QWT_BRANCH, detect_blocks, insert_qwt_branches
from qwt_deploy.graph.ir import Graph, Node
from qwt_deploy.graph.ops import OPS

_BYTES_PER_PARAM = {"fp32": 4, "fp16": 2}


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to the nearest float16 (ties to even, as ONNX Cast), kept as float32."""
    return t.half().float()


def with_qwt_branches(graph: Graph, blocks: str = "auto") -> Graph:
    """The graph calibration and export use with QwT (v1): a ``qwt_branch`` node per block."""
    try:
        found = detect_blocks(graph, blocks)
    except re.error as e:
        from qwt_deploy.errors import QwtError

        raise QwtError(f"--qwt-blocks {blocks!r} is not a valid regex ({e})",
                       "use auto, residual, or a regex whose group 1 is the block key, e.g. '^(layer\\d\\.\\d+)\\.'") from None
    return insert_qwt_branches(graph, found)


def choose_groups(c_in: int, c_out: int, group_channels: int) -> int:
    g_max = max(c_in // group_channels, 1) if group_channels > 0 else 1
    common = math.gcd(c_in, c_out)
    return max(g for g in range(1, min(g_max, common) + 1) if common % g == 0)


@dataclass
class BranchFit:
    kind: str  # "conv" (1x1, stride, groups; channels on dim 1) | "linear" (channels on the last dim)
    weight: torch.Tensor  # conv: [C_out, C_in/groups, 1, 1]; linear: [C_out, C_in]
    bias: torch.Tensor  # [C_out]
    stride: int
    groups: int
    r2: float
    mse_before: float  # mean over elements of (Y_fp - Y_q)^2
    mse_after: float  # same with the branch (equals mse_before when not kept)
    kept: bool
    rows: int = 0  # regression rows (samples x positions/tokens) the fit used
    precision: str = "fp32"  # what the deployed branch computes in: "fp32" (ort) | "fp16" (trt)

    @property
    def params(self) -> int:
        return int(self.weight.numel() + self.bias.numel()) if self.kept else 0

    @property
    def bytes(self) -> int:
        """Bytes the exported branch's weight and bias initializers take."""
        return self.params * _BYTES_PER_PARAM[self.precision]

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """``W·x + b`` as the exported branch computes it (float32 result)."""
        if self.precision == "fp16":  # FP16 operands, FP32 accumulation, FP16 output
            x, w, b = _fp16(x), _fp16(self.weight), _fp16(self.bias)
            if self.kind == "conv":
                return _fp16(F.conv2d(x, w, b, self.stride, 0, 1, self.groups))
            return _fp16(_fp16(F.linear(x, w)) + b)  # MatMul, then the FP16 bias Add
        if self.kind == "conv":
            return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)
        return F.linear(x, self.weight, self.bias)

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y + W·x + b``, as the exported Conv/MatMul (+ Casts) + Add compute it; the sum is
        float32 for both precisions."""
        return y + self.branch(x) if self.kept else y


class BranchStats:
    """Streaming normal equations of ``R = Y_fp - Y_q`` on ``[X, 1]``, per group, float64."""

    def __init__(self, kind: str, c_in: int, c_out: int, stride: int = 1, groups: int = 1):
        self.kind, self.c_in, self.c_out, self.stride, self.groups = kind, c_in, c_out, stride, groups
        d, k = c_in // groups + 1, c_out // groups
        self.G = torch.zeros(groups, d, d, dtype=torch.float64)
        self.B = torch.zeros(groups, d, k, dtype=torch.float64)
        self.rr = torch.zeros(groups, k, dtype=torch.float64)
        self.n = 0

    def rows(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(X rows [M, C_in], Y rows [M, C_out]) as the branch pairs them."""
        if self.kind == "conv":
            s = self.stride
            xs = x[:, :, ::s, ::s]
            if xs.shape[2:] != y.shape[2:]:
                raise ValueError(f"1x1 stride-{s} branch gives {tuple(xs.shape[2:])}, block output is {tuple(y.shape[2:])}")
            return xs.permute(0, 2, 3, 1).reshape(-1, self.c_in), y.permute(0, 2, 3, 1).reshape(-1, self.c_out)
        return x.reshape(-1, self.c_in), y.reshape(-1, self.c_out)

    def update(self, x_q: torch.Tensor, y_q: torch.Tensor, y_fp: torch.Tensor) -> None:
        xr, rr = self.rows(x_q, y_fp - y_q)
        xr, rr = xr.double(), rr.double()
        ci, co = self.c_in // self.groups, self.c_out // self.groups
        ones = torch.ones(len(xr), 1, dtype=torch.float64)
        for j in range(self.groups):
            a = torch.cat([xr[:, j * ci:(j + 1) * ci], ones], 1)
            r = rr[:, j * co:(j + 1) * co]
            self.G[j] += a.T @ a
            self.B[j] += a.T @ r
            self.rr[j] += (r * r).sum(0)
        self.n += len(xr)

    def solve(self, ridge: float) -> BranchFit:
        ci = self.c_in // self.groups
        n = float(max(self.n, 1))
        ws, bs = [], []
        ss_res = ss_tot = sum_rr = 0.0
        for j in range(self.groups):
            G, B = self.G[j], self.B[j]
            mean = G[-1, :-1] / n
            var = (torch.diagonal(G)[:-1] / n - mean * mean).clamp_min(0)
            lam = ridge * n * float(var.mean()) if ci else 0.0
            reg = torch.diag(torch.cat([torch.full((ci,), lam, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]))
            try:
                beta = torch.linalg.solve(G + reg, B)
            except RuntimeError:  # singular (e.g. a dead input channel with ridge 0): minimum-norm solution
                beta = torch.linalg.lstsq(G + reg, B, driver="gelsd").solution
            res = self.rr[j] - 2 * (beta * B).sum(0) + (beta * (G @ beta)).sum(0)
            ss_res += float(res.clamp_min(0).sum())
            ss_tot += float((self.rr[j] - B[-1] ** 2 / n).clamp_min(0).sum())
            sum_rr += float(self.rr[j].sum())
            ws.append(beta[:-1].T)  # [C_out/g, C_in/g]
            bs.append(beta[-1])
        r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
        kept = r2 > 0
        w = torch.cat(ws, 0).float()
        if self.kind == "conv":
            w = w.reshape(self.c_out, ci, 1, 1)
        elems = n * self.c_out
        return BranchFit(kind=self.kind, weight=w.contiguous(), bias=torch.cat(bs).float(), stride=self.stride,
                         groups=self.groups, r2=float(r2), mse_before=sum_rr / elems,
                         mse_after=(ss_res if kept else sum_rr) / elems, kept=kept, rows=int(self.n))


@dataclass
class BlockReport:
    name: str  # the block key, e.g. "_blocks.3"
    x: str
    y: str
    kind: str
    c_in: int
    c_out: int
    stride: int
    groups: int
    r2: float
    kept: bool
    params: int  # extra parameters the exported branch carries (0 if not kept)
    mse_before: float
    mse_after: float
    rows: int = 0  # regression rows; rows / (c_in / groups + 1) well below ~30 risks overfitting
    # (seen on MiniLM: 32 sentences give R^2 0.2-0.4 on calibration data and a worse model on
    # held-out text; raise --num-calib or --qwt-ridge)
    precision: str = "fp32"  # the exported branch's arithmetic: fp32 (ort) | fp16 (trt)
    bytes: int = 0  # bytes of the exported branch's weight + bias (0 if not kept)


def _stats_for(x: torch.Tensor, y: torch.Tensor, group_channels: int) -> BranchStats:
    if x.dim() == 4 and y.dim() == 4:
        stride = -(-x.shape[2] // y.shape[2])
        c_in, c_out = x.shape[1], y.shape[1]
        return BranchStats("conv", c_in, c_out, stride, choose_groups(c_in, c_out, group_channels))
    if x.dim() == y.dim() and x.shape[:-1] == y.shape[:-1]:
        return BranchStats("linear", x.shape[-1], y.shape[-1])
    raise ValueError(f"no linear branch maps a block input of shape {tuple(x.shape)} to {tuple(y.shape)}")


def run_block_float(nodes: list[Node], env: dict[str, torch.Tensor]) -> torch.Tensor:
    """The full-precision block (float weights, no quantizers, no compensation). ``env`` maps
    the block input X (and any side input) to its tensor."""
    env = dict(env)
    for n in nodes:
        y = OPS[n.op].forward(n, [env[v] for v in n.inputs], n.weight, n.bias)
        if n.activation is not None:
            y = n.activation.apply(y)
        env[n.output] = y
    return env[nodes[-1].output]


FP16_MAX = 65504.0  # largest finite float16


def fits_fp16(fit: BranchFit, x_absmax: float) -> bool:
    """Can the FP16 branch run without overflow? FP16 ends at 65504; an input, weight or
    product sum beyond it becomes inf, and so would the block output. We require the block
    input seen in calibration, and a bound on the branch output (|x|max * max_c sum|W_c| +
    max|b|), to stay below half of that, leaving headroom for held-out inputs. A block that
    fails keeps an FP32 branch (its report says so: ``precision`` "fp32")."""
    w = fit.weight.reshape(fit.weight.shape[0], -1).abs().sum(1).max() if fit.weight.numel() else torch.tensor(0.0)
    bound = x_absmax * float(w) + (float(fit.bias.abs().max()) if fit.bias.numel() else 0.0)
    return max(x_absmax, bound, float(fit.weight.abs().max()) if fit.weight.numel() else 0.0) < FP16_MAX / 2


def fit_block_branch(graph: Graph, node: Node, ins: list[list[torch.Tensor]], ridge: float,
                     group_channels: int, precision: str = "fp32") -> tuple[BranchFit, BlockReport]:
    """Fit the branch of the ``qwt_branch`` node ``node``. ``ins[k]`` holds, per calibration
    batch, what the node reads on its input k: X_q (the kept block input), Y_q (the block
    output as the branch reads it), then side inputs (e.g. an attention mask). ``precision``
    (``Target.branch_precision``) is what the deployed branch computes in: the
    fit is solved in float64 either way, and ``BranchFit.apply`` then computes what the
    backend runs, so calibration continues with the deployed value. An FP16 branch that could
    overflow (:func:`fits_fp16`) is kept in FP32."""
    if precision not in _BYTES_PER_PARAM:
        raise ValueError(f"branch precision {precision!r} is not one of {sorted(_BYTES_PER_PARAM)}")
    assert node.op == QWT_BRANCH
    by_name = {n.name: n for n in graph.nodes}
    block = [by_name[k] for k in node.attrs["block_nodes"]]
    x_value = node.inputs[0]
    stats: Optional[BranchStats] = None
    x_absmax = 0.0
    for b, (x, yq) in enumerate(zip(ins[0], ins[1])):
        env = {x_value: x, **{v: ins[k][b] for k, v in enumerate(node.inputs[2:], 2)}}
        yfp = run_block_float(block, env)
        if stats is None:
            stats = _stats_for(x, yq, group_channels)
        stats.update(x, yq, yfp)
        x_absmax = max(x_absmax, float(x.abs().max()) if x.numel() else 0.0)
    fit = stats.solve(ridge)
    fit.precision = precision if precision != "fp16" or fits_fp16(fit, x_absmax) else "fp32"
    rep = BlockReport(name=node.attrs["block"], x=x_value, y=node.inputs[1], kind=fit.kind, c_in=stats.c_in,
                      c_out=stats.c_out, stride=fit.stride, groups=fit.groups, r2=fit.r2, kept=fit.kept,
                      params=fit.params, mse_before=fit.mse_before, mse_after=fit.mse_after, rows=fit.rows,
                      precision=fit.precision, bytes=fit.bytes)
    return fit, rep


def model_parameters(graph: Graph) -> int:
    """Parameters of the deployed layers (after BatchNorm folding): the % base for reports."""
    return int(sum(t.numel() for n in graph.nodes for t in (n.weight, n.bias) if t is not None))


def compensation_summary(graph: Graph, result) -> dict:
    """Per-block R^2 and the parameter cost of each compensation, for the JSON report.

    ``branch_params``: what the exported QwT branches add (float, beside the INT8 graph).
    ``branch_precision``: their arithmetic and storage type ("fp16" for TensorRT, "fp32" for
    ONNX Runtime; "none" if no branch was kept), and ``branch_bytes`` the initializer bytes
    they add to the file (2 or 4 per parameter): the size cost, next to INT8 layers at 1 byte
    per weight.
    ``cwac_params``: CWAC's 2 numbers per output channel before folding; after the fold they
    live in the weight scales and biases the INT8 layers already have, so they add nothing
    to the deployed model (``extra_params_deployed`` counts only the branches).
    """
    from dataclasses import asdict

    base = model_parameters(graph)
    branch = sum(b.params for b in result.blocks)
    precisions = sorted({b.precision for b in result.blocks if b.kept})
    cwac = sum(2 * len(f.alpha) for f in result.params.cwac.values())
    return dict(
        blocks=[asdict(b) for b in result.blocks],
        blocks_found=len(result.blocks), blocks_kept=sum(b.kept for b in result.blocks),
        model_params=base, branch_params=branch, cwac_params=cwac,
        branch_precision=",".join(precisions) or "none", branch_bytes=sum(b.bytes for b in result.blocks),
        extra_params_deployed=branch, extra_params_deployed_pct=100.0 * branch / base if base else 0.0,
        compensation_params_pct=100.0 * (branch + cwac) / base if base else 0.0,
    )


class QwtBlockBranches:
    """QwT (v1) as a calibration algorithm. :meth:`prepare` adds a ``qwt_branch`` node per block
    to the graph; for each such node, :meth:`statistics` streams the normal equations of
    ``Y_fp - Y_q`` on ``[X_q, 1]`` (:meth:`fit` runs the FP block to get Y_fp), :meth:`solve`
    gives the closed form, and :meth:`apply` adds ``W·X_q + b`` to the block output in the
    deployed precision. ``precision`` is the target's (``Target.branch_precision``)."""

    def __init__(self, ridge: float = 1e-3, group_channels: int = 64, blocks: str = "auto",
                 precision: str = "fp32"):
        if precision not in _BYTES_PER_PARAM:
            raise ValueError(f"branch precision {precision!r} is not one of {sorted(_BYTES_PER_PARAM)}")
        self.ridge, self.group_channels, self.blocks, self.precision = ridge, group_channels, blocks, precision

    def prepare(self, graph: Graph) -> Graph:
        return with_qwt_branches(graph, self.blocks)

    def statistics(self, x: torch.Tensor, y: torch.Tensor) -> BranchStats:
        return _stats_for(x, y, self.group_channels)

    def solve(self, stats: BranchStats) -> BranchFit:
        return stats.solve(self.ridge)

    @staticmethod
    def apply(fit: BranchFit, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return fit.apply(x, y)

    def fit(self, graph: Graph, node: Node, ins: list[list[torch.Tensor]]) -> tuple[BranchFit, BlockReport]:
        return fit_block_branch(graph, node, ins, self.ridge, self.group_channels, self.precision)
