"""The hard phase on our kernels: pattern-pruned convs as a torch custom op (issue #16).

From the hard prune on, the masks are fixed, so each pattern-pruned conv's forward, input gradient
and weight gradient can be generated kernels that touch only the kept taps of kept kernel groups,
compiled with TVM once per layer shape and batch size: for the CPU (``compile.conv_kernels`` /
``compile.train_kernels``, on torch's channels_last tensors: train with
``schedule.memory_format = "channels_last"``, or each op boundary copies) and for NVIDIA GPUs
(``compile.cuda.kernels`` / ``compile.cuda.train_kernels``, on NCHW tensors, device code built with
nvcc for the GPU's arch, run on torch's current stream). ``clicktrain::pattern_conv2d`` is a
registered custom op with an autograd formula and fake kernels (what ``torch.compile`` and DDP
need). Removed weights get an exactly zero gradient. The op keeps no state beyond the weight and
its mask, so checkpoints are unchanged.

``install`` swaps the class of each eligible conv for ``PatternKernelConv2d`` (same parameters,
same state dict), checks ours against torch's conv on the layer's shapes (forward and both
gradients) and measures both at the training batch size, and keeps ours only where it agrees and
is faster; evaluation (no grad) and other batch sizes compile or fall back as recorded in
``LayerDecision``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import tvm
import tvm_ffi
from torch import Tensor, nn

from ..compile.conv_kernels import ConvSpec, choose_tile, compact_order, conv_tvmscript, library_taps, \
    pattern_assignment
from ..compile.cuda.kernels import CudaConvSpec, conv_cuda_tvmscript, cuda_covers, cuda_schedule
from ..compile.cuda.train_kernels import conv_input_grad_cuda_tvmscript, conv_weight_grad_cuda_tvmscript, \
    tap_table, weight_grad_sum_cuda_tvmscript
from ..compile.targets import TARGETS, WIDE_TILES
from ..compile.train_kernels import conv_input_grad_tvmscript, conv_weight_grad_tvmscript, entry_owners, \
    tap_offsets, transposed_entries


def host_target() -> tvm.target.Target:
    """The training host as a TVM target, with the threads torch uses."""
    return tvm.target.Target({**TARGETS.get("x86")().tvm_target, "num-cores": torch.get_num_threads()})


def _share_torch_threads() -> None:
    """Before TVM's thread pool starts (first parallel kernel call): as many threads as torch's,
    not pinned to cores (two training processes sharing a machine would pin to the same ones),
    and sleeping as soon as a kernel ends: spinning workers take the cores from torch's threads
    between our kernels. Torch's OpenMP threads spin likewise between torch's ops unless the
    process starts with OMP_WAIT_POLICY=PASSIVE, which slows torch's own ops (measured in
    benchmarks/results/sparse_training_t2*.md); at 1 thread neither matters."""
    os.environ.setdefault("TVM_NUM_THREADS", str(torch.get_num_threads()))
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")


def host_lanes() -> int:
    return TARGETS.get("x86")().sparse_layouts[0].lanes


@functools.cache
def compiled_kernels(spec: ConvSpec, threads: int) -> tuple:
    """The three kernels of ``spec``, compiled for the host on first use. The masks are runtime
    tables, so layers of one shape and kept-entry count (every same-shape layer under a uniform
    ratio) share one build: ResNet-20's 18 pattern convs need 5."""
    _share_torch_threads()
    sources = {"forward": conv_tvmscript(spec, "forward"),
               "grad_weight": conv_weight_grad_tvmscript(spec, "grad_weight", parts=threads),
               "grad_input": conv_input_grad_tvmscript(spec, "grad_input")}
    module = tvm.compile(tvm.IRModule({name: tvm.script.from_source(text) for name, text in sources.items()}),
                         target=host_target()).jit()
    return module["forward"], module["grad_weight"], module["grad_input"]


@functools.cache
def compiled_cuda_kernels(spec: CudaConvSpec, arch: str) -> tuple:
    """The four GPU kernels of ``spec`` (forward, per-image weight gradient, its sum over the
    images, input gradient), built with nvcc for ``arch`` on first use."""
    from ..compile.cuda.toolchain import build_cuda_kernels  # loads TVM's CUDA backend

    names = ("forward", "grad_weight_partial", "grad_weight_sum", "grad_input")
    module, _ = build_cuda_kernels({
        "forward": conv_cuda_tvmscript(spec, "forward"),
        "grad_weight_partial": conv_weight_grad_cuda_tvmscript(spec, "grad_weight_partial"),
        "grad_weight_sum": weight_grad_sum_cuda_tvmscript(spec, "grad_weight_sum"),
        "grad_input": conv_input_grad_cuda_tvmscript(spec, "grad_input")}, arch)
    return tuple(module[name] for name in names)


def ineligible_reason(module: nn.Conv2d, block_size: int, lanes: int) -> str | None:
    """Why this pattern-pruned conv cannot run on the op (None: it can); ``lanes``: the CPU's."""
    if module.kernel_size != (3, 3):
        return f"kernel {module.kernel_size}, not 3x3"
    if module.groups != 1:
        return f"groups={module.groups}"
    if module.bias is not None:
        return "has a bias"
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return f"padding {module.padding!r} ({module.padding_mode})"
    device = module.weight.device.type
    if module.weight.dtype != torch.float32 or device not in ("cpu", "cuda"):
        return f"weight {module.weight.dtype} on {module.weight.device}, not float32 on the CPU or a CUDA GPU"
    if device == "cuda":
        return cuda_covers({"kernel": module.kernel_size, "stride": module.stride, "dilation": module.dilation,
                            "padding": (*module.padding, *module.padding)})
    if module.out_channels % math.gcd(lanes, block_size):
        return f"{module.out_channels} output channels, not a multiple of {math.gcd(lanes, block_size)} lanes"
    return None


class _PatternLayer:
    """What the CPU and GPU kernels of one pattern-pruned conv share: where each slot of the
    compact weights wv comes from in the flat weight (``compact_order``'s index, -1 in padded
    lanes), and the tensor layout the kernels read and write (``memory_format``)."""

    memory_format: torch.memory_format
    lanes: int
    out_hw: tuple[int, int]
    out_channels: int

    def _entries(self, module: nn.Conv2d, pattern_ids: np.ndarray, library: np.ndarray, block_size: int,
                 spec_type: type, **fields) -> tuple:
        """(spec without entries, ptr, coff, index): ``compact_order`` of the conv on ``self.lanes``
        lanes, its spec of ``spec_type`` with the device's ``fields``."""
        assign = pattern_assignment(np.asarray(pattern_ids), block_size, module.out_channels, self.lanes)
        ph, pw = module.padding
        base = spec_type(in_channels=module.in_channels, out_channels=module.out_channels, lanes=self.lanes,
                         groups=library_taps(np.asarray(library, bool)), entries=0, stride=module.stride,
                         padding=(ph, pw, ph, pw), dilation=module.dilation, **fields)
        return (base, *compact_order(assign, base))

    def _index(self, index: np.ndarray, device: torch.device) -> None:
        self.gather = torch.from_numpy(np.maximum(index, 0)).to(device)
        self.valid = torch.from_numpy(index >= 0).to(device)  # padded lanes and empty layers hold no weight
        self.kept_positions = torch.nonzero(self.valid).flatten()  # in wv
        self.kept_weights = self.gather[self.kept_positions]  # in the flat weight
        self.kept_taps = int(self.valid.sum())

    def compact(self, weight: Tensor) -> Tensor:
        """wv: the kept weights in the kernels' compact order (zeros in padded lanes)."""
        return torch.where(self.valid, weight.detach().reshape(-1)[self.gather], 0.0).contiguous()

    def expand(self, dwv: Tensor, weight: Tensor) -> Tensor:
        """dW (contiguous, the weight's shape) from the kernels' dwv: zero outside the kept taps."""
        dw = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
        dw[self.kept_weights] = dwv[self.kept_positions]
        return dw.view(weight.shape)


class PatternConvKernels(_PatternLayer):
    """The CPU kernels of one pattern-pruned conv and the index tables they read (channels_last).

    pattern_ids: int (ceil(OC / B), IC), -1 removed; library: bool (K, 9). Lanes: the host's SIMD
    width cut to divide B (so the lanes of a kernel block share its pattern)."""

    memory_format = torch.channels_last

    def __init__(self, module: nn.Conv2d, pattern_ids: np.ndarray, library: np.ndarray, block_size: int,
                 height: int, width: int, lanes: int | None = None) -> None:
        self.lanes = math.gcd(lanes or host_lanes(), block_size)
        base, ptr, coff, index = self._entries(module, pattern_ids, library, block_size, ConvSpec, height=height,
                                               width=width, in_lanes=module.in_channels, channels_last_out=True)
        self.spec = dataclasses.replace(base, entries=int(ptr[-1]), tile=choose_tile(
            *base.out_hw, WIDE_TILES))
        self.out_hw, self.out_channels = self.spec.out_hw, module.out_channels
        self._index(index, torch.device("cpu"))
        ptr_t, ob_t, kfw = transposed_entries(ptr, coff, self.spec)
        self.tables = {name: tvm.runtime.tensor(a) for name, a in {
            "ptr": ptr, "coff": coff, "owner": entry_owners(ptr, self.spec), "toff": tap_offsets(ptr, coff, self.spec),
            "ptrT": ptr_t, "obT": ob_t,
            "kfw": kfw, "bias": np.zeros((self.spec.out_blocks, self.lanes), np.float32)}.items()}

    def kernels(self, batch: int) -> tuple:
        """(forward, weight gradient, input gradient) for this batch size (``compiled_kernels``)."""
        return compiled_kernels(dataclasses.replace(self.spec, batch=batch), torch.get_num_threads())

    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        """x (N, IC, H, W) channels_last -> (N, OC, OH, OW) channels_last."""
        x = x.contiguous(memory_format=torch.channels_last)
        n = x.shape[0]
        forward, _, _ = self.kernels(n)
        y = torch.empty((n, *self.out_hw, self.out_channels), dtype=x.dtype)
        t = self.tables
        forward(_tvm(x.permute(0, 2, 3, 1).unsqueeze(1)), t["ptr"], t["coff"], _tvm(self.compact(weight)),
                t["bias"], _tvm(y))
        return y.permute(0, 3, 1, 2)

    def backward(self, grad: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        """(dX, dW) for dY = ``grad``; dW is zero outside the kept taps."""
        x = x.contiguous(memory_format=torch.channels_last)
        n = x.shape[0]
        _, grad_weight, grad_input = self.kernels(n)
        dy = _tvm(grad.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1))
        t = self.tables
        dwv = torch.empty(self.valid.shape, dtype=torch.float32)
        grad_weight(_tvm(x.permute(0, 2, 3, 1)), dy, t["owner"], t["toff"], _tvm(dwv))
        dx = torch.empty((n, x.shape[2], x.shape[3], x.shape[1]), dtype=x.dtype)
        grad_input(dy, t["ptrT"], t["obT"], t["kfw"], _tvm(self.compact(weight)), _tvm(dx))
        return dx.permute(0, 3, 1, 2), self.expand(dwv, weight)


CUDA_LANES = 16  # output channels per GPU thread's register tile (the deploy kernels' widest layout)


class CudaPatternConvKernels(_PatternLayer):
    """The GPU kernels of one pattern-pruned conv on its weight's GPU (NCHW, contiguous), and the
    index tables they read there (``compile.cuda.train_kernels``). Lanes: 16 cut to divide B."""

    memory_format = torch.contiguous_format

    def __init__(self, module: nn.Conv2d, pattern_ids: np.ndarray, library: np.ndarray, block_size: int,
                 height: int, width: int) -> None:
        from ..compile.cuda.toolchain import load_cuda_backend  # before any CUDA tensor reaches TVM

        load_cuda_backend()
        device = module.weight.device
        self.lanes = math.gcd(CUDA_LANES, block_size)
        base, ptr, coff, index = self._entries(module, pattern_ids, library, block_size, CudaConvSpec, height=height,
                                               width=width, in_lanes=1)
        most = int(np.diff(ptr[:: len(base.groups)]).max(initial=0))
        self.spec = dataclasses.replace(base, entries=int(ptr[-1]), **cuda_schedule(
            *base.out_hw, module.stride, max(1, 32 // self.lanes), max(most, 1)))
        self.out_hw, self.out_channels = self.spec.out_hw, module.out_channels
        major, minor = torch.cuda.get_device_capability(device)
        self.arch = f"sm_{major}{minor}"
        self._index(index, device)
        ptr_t, ob_t, kfw = transposed_entries(ptr, coff, self.spec)
        # a TVM view of a torch tensor (DLPack) keeps the tensor alive
        self.tables = {name: _tvm(torch.from_numpy(np.ascontiguousarray(a)).to(device)) for name, a in {
            "ptr": ptr, "coff": coff, "owner": entry_owners(ptr, self.spec), "taps": tap_table(self.spec),
            "ptrT": ptr_t, "obT": ob_t, "kfw": kfw,
            "bias": np.zeros((self.spec.out_blocks, self.lanes), np.float32)}.items()}

    def kernels(self, batch: int) -> tuple:
        return compiled_cuda_kernels(dataclasses.replace(self.spec, batch=batch), self.arch)

    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        """x (N, IC, H, W) -> (N, OC, OH, OW), contiguous, on the GPU."""
        x = x.contiguous()
        forward = self.kernels(x.shape[0])[0]
        y = torch.empty((x.shape[0], self.out_channels, *self.out_hw), dtype=x.dtype, device=x.device)
        t = self.tables
        with torch.cuda.device(x.device), tvm_ffi.use_torch_stream():
            forward(_tvm(x), t["ptr"], t["coff"], _tvm(self.compact(weight)), t["bias"], _tvm(y))
        return y

    def backward(self, grad: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        """(dX, dW) for dY = ``grad``; dW is zero outside the kept taps."""
        x, grad, n = x.contiguous(), grad.contiguous(), x.shape[0]
        _, grad_weight_partial, grad_weight_sum, grad_input = self.kernels(n)
        partial = torch.empty((n, self.valid.numel()), dtype=torch.float32, device=x.device)
        dwv = torch.empty(self.valid.numel(), dtype=torch.float32, device=x.device)
        dx = torch.empty_like(x)
        t = self.tables
        with torch.cuda.device(x.device), tvm_ffi.use_torch_stream():
            grad_weight_partial(_tvm(x), _tvm(grad), t["owner"], t["coff"], t["taps"], _tvm(partial))
            grad_weight_sum(_tvm(partial), _tvm(dwv))
            grad_input(_tvm(grad), t["ptrT"], t["obT"], t["kfw"], _tvm(self.compact(weight)), _tvm(dx))
        return dx, self.expand(dwv, weight)


def pattern_layer_kernels(module: nn.Conv2d, pattern_ids: np.ndarray, library: np.ndarray, block_size: int,
                          height: int, width: int, lanes: int | None = None) -> _PatternLayer:
    """The kernels of one pattern-pruned conv on its weight's device."""
    if module.weight.device.type == "cuda":
        return CudaPatternConvKernels(module, pattern_ids, library, block_size, height, width)
    return PatternConvKernels(module, pattern_ids, library, block_size, height, width, lanes)


def _tvm(tensor: Tensor):
    """A zero-copy TVM view of a contiguous torch tensor (the kernels read flat offsets)."""
    if not tensor.is_contiguous():
        raise ValueError(f"tensor {tuple(tensor.shape)} is not contiguous in the kernels' layout")
    return tvm.runtime.from_dlpack(tensor)


_LAYERS: list[_PatternLayer] = []  # the op's layer argument indexes this


def register_layer(kernels: _PatternLayer) -> int:
    """Make ``kernels`` callable through the op; returns its ``layer`` argument."""
    _LAYERS.append(kernels)
    return len(_LAYERS) - 1


@torch.library.custom_op("clicktrain::pattern_conv2d", mutates_args=())
def pattern_conv2d(x: Tensor, weight: Tensor, layer: int) -> Tensor:
    """The pattern-sparse conv of registered layer ``layer``, in and out in its kernels'
    ``memory_format`` (channels_last on the CPU, contiguous NCHW on a GPU)."""
    return _LAYERS[layer].forward(x, weight)


@pattern_conv2d.register_fake
def _(x: Tensor, weight: Tensor, layer: int) -> Tensor:
    kernels = _LAYERS[layer]
    return x.new_empty((x.shape[0], weight.shape[0], *kernels.out_hw)).contiguous(
        memory_format=kernels.memory_format)


@torch.library.custom_op("clicktrain::pattern_conv2d_backward", mutates_args=())
def pattern_conv2d_backward(grad: Tensor, x: Tensor, weight: Tensor, layer: int) -> tuple[Tensor, Tensor]:
    """(input gradient, weight gradient) of ``pattern_conv2d``."""
    return _LAYERS[layer].backward(grad, x, weight)


@pattern_conv2d_backward.register_fake
def _(grad: Tensor, x: Tensor, weight: Tensor, layer: int) -> tuple[Tensor, Tensor]:
    # dW is contiguous whatever the weight's format (a channels_last model has channels_last weights)
    return torch.empty_like(x, memory_format=_LAYERS[layer].memory_format), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, layer = inputs
    ctx.save_for_backward(x, weight)
    ctx.layer = layer


def _backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    dx, dw = pattern_conv2d_backward(grad, x, weight, ctx.layer)
    return dx, dw, None


pattern_conv2d.register_autograd(_backward, setup_context=_setup_context)


class PatternKernelConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose training forward runs ``pattern_conv2d`` (``install`` sets the class
    of an existing conv to this, keeping its parameters, hooks and state dict keys)."""

    pattern_layer: int
    use_pattern_kernels: bool

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.use_pattern_kernels and self.training and torch.is_grad_enabled():
            return pattern_conv2d(input, weight, self.pattern_layer)
        return super()._conv_forward(input, weight, bias)


@dataclass
class LayerDecision:
    """What ``install`` measured for one pattern-pruned conv (ms: fwd + bwd at the training batch,
    the fastest of interleaved rounds)."""

    layer: str
    used: bool
    reason: str
    torch_ms: float | None = None
    ours_ms: float | None = None
    kept_taps: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _interleaved_min_ms(steps: dict, rounds: int) -> dict[str, float]:
    """Per named step, the fastest of ``rounds`` timings taken in turn (after one warm-up each), so
    that load from elsewhere, which only ever adds time, hits every step alike."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(1000 * (time.perf_counter() - started))
    return {name: min(t) for name, t in times.items()}


def _input_sizes(model: nn.Module, modules: dict[str, nn.Module], sample: Tensor) -> dict[str, tuple]:
    """Input (C, H, W) of each named conv on ``sample``."""
    sizes, hooks = {}, []

    def record(name: str, args: tuple) -> None:  # a pre-hook that returns nothing leaves the input
        sizes.setdefault(name, tuple(args[0].shape))

    for name, module in modules.items():
        hooks.append(module.register_forward_pre_hook(lambda m, args, n=name: record(n, args)))
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            model(sample)
            model.train(was)
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


TOLERANCE = 1e-3  # of ours against torch's conv, relative to the largest reference value (float32 sums)


def _gradients(conv, x: Tensor, weight: Tensor, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(Y, dX, dW) of ``conv`` for output gradient ``grad``, returned as in a network (not
    accumulated into leaves); on a GPU, after the work is done (for timing)."""
    y = conv(x, weight)
    dx, dw = torch.autograd.grad(y, (x, weight), grad)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return y.detach(), dx, dw


def _disagreement(ours: tuple, reference: tuple, kept: Tensor) -> float:
    """The largest difference of (Y, dX, dW) from the reference's, relative to the reference's
    largest magnitude; dW on the kept taps only (ours is zero elsewhere by construction)."""
    ref_y, ref_dx, ref_dw = reference
    errors = []
    for got, ref in zip(ours, (ref_y, ref_dx, torch.where(kept.view(ref_dw.shape), ref_dw, 0.0))):
        scale = max(float(ref.abs().max()), 1e-12)
        errors.append(float((got - ref).abs().max()) / scale)
    return max(errors)


def install(model: nn.Module, layers: dict[str, tuple[nn.Conv2d, np.ndarray, int]], library: np.ndarray,
            sample: Tensor, batch: int, rounds: int = 5, force: bool = False,
            memory_format: torch.memory_format = torch.contiguous_format) -> list[LayerDecision]:
    """Put the pattern-pruned convs ``layers`` (name -> (module, pattern_ids (G, IC), block size))
    on the op where it agrees with torch's conv (forward and both gradients, within ``TOLERANCE``)
    and is faster, fwd + bwd at ``batch`` (``force``: wherever eligible and agreeing, untimed),
    on inputs in the ``memory_format`` the model trains in, on the weights' device.
    ``sample``: one input batch of the model, for the convs' map sizes. A layer whose kernels
    disagree stays on torch with the difference in its reason, and a warning."""
    from ..compile.errors import CompileError

    sizes = _input_sizes(model, {name: m for name, (m, _, _) in layers.items()}, sample[:1])
    lanes, decisions = host_lanes(), []
    for name, (module, pattern_ids, block_size) in layers.items():
        reason = ineligible_reason(module, block_size, lanes)
        if reason:
            decisions.append(LayerDecision(name, False, reason))
            continue
        _, channels, height, width = sizes[name]
        kernels = pattern_layer_kernels(module, pattern_ids, library, block_size, height, width, lanes)
        module.__class__ = PatternKernelConv2d
        module.pattern_layer, module.use_pattern_kernels = register_layer(kernels), False
        device = module.weight.device
        x = torch.randn(batch, channels, height, width, device=device).contiguous(
            memory_format=memory_format).requires_grad_()
        weight = module.weight.detach().clone().requires_grad_()
        grad = torch.randn(batch, module.out_channels, *kernels.out_hw, device=device).contiguous(
            memory_format=memory_format)

        def torch_conv(a: Tensor, w: Tensor) -> Tensor:
            return nn.functional.conv2d(a, w, None, module.stride, module.padding, module.dilation)

        def ours(a: Tensor, w: Tensor) -> Tensor:
            return pattern_conv2d(a, w, module.pattern_layer)

        kept = torch.zeros(weight.numel(), dtype=torch.bool, device=device)
        kept[kernels.kept_weights] = True
        try:
            error = _disagreement(_gradients(ours, x, weight, grad), _gradients(torch_conv, x, weight, grad), kept)
        except CompileError as failure:
            decisions.append(LayerDecision(name, False, f"our kernels do not build: {failure}"))
            continue
        if not error <= TOLERANCE:
            reason = (f"ours differs from torch's conv by {error:.1e} of the largest value (tolerance "
                      f"{TOLERANCE:.0e}): a kernel bug; the layer stays on torch")
            warnings.warn(f"{name}: {reason}", RuntimeWarning, stacklevel=2)
            decisions.append(LayerDecision(name, False, reason, kept_taps=kernels.kept_taps))
            continue
        if force:
            module.use_pattern_kernels = True
            decisions.append(LayerDecision(name, True, "forced", kept_taps=kernels.kept_taps))
            continue
        timed = _interleaved_min_ms({"torch": lambda: _gradients(torch_conv, x, weight, grad),
                                     "ours": lambda: _gradients(ours, x, weight, grad)}, rounds)
        torch_ms, ours_ms = timed["torch"], timed["ours"]
        module.use_pattern_kernels = ours_ms < torch_ms
        decisions.append(LayerDecision(name, module.use_pattern_kernels, "faster" if module.use_pattern_kernels
                                       else "torch's conv is faster", round(torch_ms, 3), round(ours_ms, 3),
                                       kernels.kept_taps))
    return decisions
