"""CUDA target: GPU kernels checked on this CPU (emulated thread loops) against torch and
onnxruntime, the sm_90 library built with nvcc, presets and errors; GPU runs where a GPU exists."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import onnx
import pytest
import torch
import tvm
from typer.testing import CliRunner

from clicktrain_deploy.cli import app
from clicktrain_deploy.compile.build import compile_model
from clicktrain_deploy.compile.conv_kernels import (
    all_taps, compact_order, compact_weights, connectivity_assignment, library_taps, pattern_assignment,
)
from clicktrain_deploy.compile.cuda.kernels import (
    CudaConvSpec, avgpool_cuda_tvmscript, conv_cuda_tvmscript, cuda_covers, cuda_schedule, dense_cuda_tvmscript,
    entry_channels, maxpool_cuda_tvmscript,
)
from clicktrain_deploy.compile.build import lower_model
from clicktrain_deploy.compile.cuda.lower import CudaConvKernels
from clicktrain_deploy.compile.cuda.toolchain import (
    build_cuda_kernels, build_emulated, embedded_fatbins, gpu_present, run_on_cuda,
)
from clicktrain_deploy.compile.cuda.train_kernels import (
    conv_input_grad_cuda_tvmscript, conv_weight_grad_cuda_tvmscript, tap_table, weight_grad_sum_cuda_tvmscript,
)
from clicktrain_deploy.compile.train_kernels import entry_owners, transposed_entries
from clicktrain_deploy.compile.errors import CompileError
from clicktrain_deploy.compile.frontend import import_onnx
from clicktrain_deploy.compile.passes import rewrite_convs
from clicktrain_deploy.compile.targets import CUDA_ARCHS, TARGETS
from clicktrain_deploy.export.check import onnxruntime_session

from .test_compile import _real_inputs
from .test_conv_kernels import LIBRARY, _pattern_weight, reference_epilogue
from .test_passes import _block, _calls, _module, _reference

needs_gpu = pytest.mark.skipif("not gpu_present()", reason="no NVIDIA GPU on this machine")


def _emulated_conv(weight, assign, groups, *, height, width, stride, lanes, batch=2,
                   epilogue=(("residual",), ("relu",))):
    """Run the GPU conv kernel's statements on the CPU; compare with torch in float64. ``weight``:
    (OC, IC, 3, 3) with padding 1, or (OC, IC, 1, 1) without.

    Returns the spec and the most entries of one output block (chunks of at most 5 are staged)."""
    out_channels, in_channels, kh, kw = weight.shape
    pad = kh // 2
    base = dict(in_channels=in_channels, out_channels=out_channels, height=height, width=width,
                in_lanes=1, lanes=lanes, groups=groups, kernel=(kh, kw), stride=(stride, stride),
                padding=(pad,) * 4, epilogue=epilogue, batch=batch)
    ptr, _, wv = compact_weights(weight, assign, CudaConvSpec(entries=0, **base))
    oh, ow = CudaConvSpec(entries=0, **base).out_hw
    spec = CudaConvSpec(entries=int(ptr[-1]), **base, **cuda_schedule(oh, ow, stride, 32 // lanes, 5, (kh, kw)))
    assert cuda_covers(spec) is None
    func = tvm.script.from_source(conv_cuda_tvmscript(spec, "conv", emulate=True))
    kernel = build_emulated(tvm.IRModule({"conv": func})).jit()["conv"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, in_channels, height, width)).astype(np.float32)
    bias = rng.standard_normal(out_channels).astype(np.float32)
    res = rng.standard_normal((batch, out_channels, oh, ow)).astype(np.float32)
    bias_blocks = np.zeros(spec.out_blocks * lanes, np.float32)
    bias_blocks[:out_channels] = bias
    args = [x, ptr, entry_channels(assign, len(groups)), wv, bias_blocks.reshape(-1, lanes)]
    args += [res] if spec.residual else []
    args += [np.zeros((batch, out_channels, oh, ow), np.float32)]
    tensors = [tvm.runtime.tensor(a) for a in args]
    kernel(*tensors)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(weight).double(),
                                     torch.from_numpy(bias).double(), stride=stride, padding=pad)
    ref = reference_epilogue(ref, epilogue, torch.from_numpy(res).double())
    np.testing.assert_allclose(tensors[-1].numpy(), ref.numpy(), atol=2e-5, rtol=1e-5)
    return spec, int(np.diff(ptr[:: len(groups)]).max())


@pytest.mark.parametrize("out_channels,in_channels,size,stride,lanes,block", [
    (32, 24, (14, 14), 1, 16, 16),   # two output blocks, several chunks of entries
    (24, 20, (9, 7), 2, 8, 8),       # odd sizes, stride 2 (halo and tile edges)
    (20, 12, (40, 33), 2, 4, 4),     # several tiles each way, last channel block partial
])
def test_gpu_pattern_conv_matches_torch(out_channels, in_channels, size, stride, lanes, block):
    weight, ids = _pattern_weight(out_channels, in_channels, block, removed=0.5)
    ids[0] = -1  # a fully removed output block: no entries, only bias (+ residual)
    weight[:block] = 0
    spec, most_entries = _emulated_conv(weight, pattern_assignment(ids, block, out_channels, lanes),
                                        library_taps(LIBRARY), height=size[0], width=size[1], stride=stride,
                                        lanes=lanes)
    assert most_entries > spec.chunk  # entries of one block span several shared-memory chunks


def test_gpu_dense_connectivity_and_pointwise_convs_match_torch():
    rng = np.random.default_rng(2)
    stem = rng.standard_normal((16, 1, 3, 3)).astype(np.float32)  # dense stem, one input channel
    _emulated_conv(stem, np.zeros((1, 1), int), (all_taps(3, 3),), height=28, width=28, stride=1, lanes=16,
                   epilogue=(("relu",),))
    weight, _ = _pattern_weight(24, 16, 1, removed=0.7, seed=1)  # B=1: per-kernel patterns
    kept = np.abs(weight).sum((2, 3)) > 0
    _emulated_conv(weight, connectivity_assignment(kept, 8), (all_taps(3, 3),), height=9, width=7, stride=1, lanes=8)
    shortcut = rng.standard_normal((32, 16, 1, 1)).astype(np.float32)  # 1x1, pad 0, stride 2
    _emulated_conv(shortcut, np.zeros((2, 16), int), (all_taps(1, 1),), height=13, width=13, stride=2, lanes=16,
                   epilogue=())


@pytest.mark.parametrize("epilogue", [(("clip", 0.0, 6.0),), (("hardswish", 1 / 6, 0.5),), (("sigmoid",),),
                                      (("residual",), ("silu",)), (("hardsigmoid", 0.2, 0.5),)],
                         ids=lambda e: "-".join(s[0] for s in e))
def test_gpu_conv_epilogues_match_torch(epilogue):
    weight = np.random.default_rng(4).standard_normal((12, 8, 3, 3)).astype(np.float32)
    _emulated_conv(weight, np.zeros((3, 8), int), (all_taps(3, 3),), height=7, width=6, stride=2, lanes=4,
                   epilogue=epilogue)


def test_cuda_covers():
    assert cuda_covers({"kernel": (3, 3)}) is None
    assert cuda_covers({"kernel": (1, 1), "padding": (0, 0, 0, 0), "stride": (2, 2)}) is None
    assert "7x7" in cuda_covers({"kernel": (7, 7), "padding": (3, 3, 3, 3), "stride": (2, 2)})
    assert "padding" in cuda_covers({"kernel": (3, 3), "padding": (0, 1, 1, 0)})
    assert "padding" in cuda_covers({"kernel": (1, 1)})  # ConvSpec's default padding is 1
    assert "stride" in cuda_covers({"kernel": (3, 3), "stride": (2, 1)})
    assert "stride" in cuda_covers({"kernel": (3, 3), "stride": (3, 3)})
    assert "dilation" in cuda_covers({"kernel": (3, 3), "dilation": (2, 2), "padding": (2, 2, 2, 2)})
    assert "grouped" in cuda_covers({"kernel": (3, 3), "groups": 4})
    spec = CudaConvSpec(8, 8, 9, 9, 1, 4, (all_taps(3, 3),), 16, stride=(2, 2))
    assert cuda_covers(spec) is None


def test_gpu_conv_kernels_keep_accumulators_in_registers():
    """ptxas on the conv kernels alone (sm_90, each lane count's register tile, epilogues): no
    spills to local memory, within the 255-register limit."""
    from clicktrain_deploy.compile.cuda.toolchain import load_cuda_backend, nvcc_device_compiler

    funcs = {}
    for i, (lanes, k, s, groups, epi) in enumerate([
            (16, 3, 1, library_taps(LIBRARY), (("residual",), ("relu",))),
            (8, 3, 2, (all_taps(3, 3),), (("hardswish", 1 / 6, 0.5),)),
            (4, 1, 2, (all_taps(1, 1),), (("residual",), ("silu",)))]):
        oh = (28 - 1) // s + 1
        spec = CudaConvSpec(64, 64, 28, 28, 1, lanes, groups, 64 * 64 // lanes, kernel=(k, k), stride=(s, s),
                            padding=(k // 2,) * 4, batch=2, epilogue=epi,
                            **cuda_schedule(oh, oh, s, 32 // lanes, 64, k))
        funcs[f"conv{i}"] = tvm.script.from_source(conv_cuda_tvmscript(spec, f"conv{i}"))
    load_cuda_backend()
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm"}})
    with nvcc_device_compiler("sm_90") as built, target:
        tvm.compile(tvm.IRModule(funcs), target=target)
    assert len(built) == 1 and built[0]["spill_bytes"] == 0
    assert 32 < built[0]["max_registers"] <= 255


def _training_spec(out_channels, in_channels, size, stride, block, batch, removed):
    """A pattern conv's GPU training spec, its compact tables and weights, as the op builds them."""
    weight, ids = _pattern_weight(out_channels, in_channels, block, removed, seed=out_channels + batch)
    lanes = math.gcd(16, block)
    assign = pattern_assignment(ids, block, out_channels, lanes)
    base = CudaConvSpec(in_channels=in_channels, out_channels=out_channels, height=size[0], width=size[1],
                        in_lanes=1, lanes=lanes, groups=library_taps(LIBRARY), entries=0, stride=(stride, stride),
                        batch=batch)
    ptr, coff, index = compact_order(assign, base)
    most = int(np.diff(ptr[:: len(base.groups)]).max(initial=0))
    spec = dataclasses.replace(base, entries=int(ptr[-1]),
                               **cuda_schedule(*base.out_hw, stride, max(1, 32 // lanes), max(most, 1)))
    wv = np.where(index >= 0, weight.reshape(-1)[np.maximum(index, 0)], 0).astype(np.float32)
    return weight, spec, ptr, coff, index, wv


@pytest.mark.parametrize("out_channels,in_channels,size,stride,block,batch,removed", [
    (16, 16, (8, 8), 1, 16, 2, 0.7),       # one block of 16 lanes
    (32, 12, (9, 7), 2, 16, 3, 0.6),       # stride 2 on odd sizes: taps that reach only some pixels
    (24, 12, (7, 9), 1, 4, 2, 0.5),        # B = 4: 4 lanes
    (10, 5, (6, 5), 2, 2, 2, 0.5),         # B = 2, odd channels
    (48, 16, (6, 7), 2, 16, 1, 1.0),       # batch 1, every kernel removed: zeros
])
def test_gpu_training_kernels_match_torch_gradients(out_channels, in_channels, size, stride, block, batch, removed):
    """The GPU forward, weight gradient (per image, then summed) and input gradient of a pattern
    conv, emulated on this CPU, against torch's float64 conv and its gradients on the masked weight."""
    weight, spec, ptr, coff, index, wv = _training_spec(out_channels, in_channels, size, stride, block, batch,
                                                        removed)
    sources = {"fwd": conv_cuda_tvmscript(spec, "fwd", emulate=True),
               "wpart": conv_weight_grad_cuda_tvmscript(spec, "wpart", emulate=True),
               "wsum": weight_grad_sum_cuda_tvmscript(spec, "wsum", emulate=True),
               "dgrad": conv_input_grad_cuda_tvmscript(spec, "dgrad", emulate=True)}
    kernels = build_emulated(tvm.IRModule({k: tvm.script.from_source(v) for k, v in sources.items()})).jit()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, in_channels, *size)).astype(np.float32)
    dy = rng.standard_normal((batch, out_channels, *spec.out_hw)).astype(np.float32)
    tensor = tvm.runtime.tensor
    slots = max(spec.entries, 1) * len(spec.groups[0]) * spec.lanes
    y, dx = tensor(np.zeros(dy.shape, np.float32)), tensor(np.zeros_like(x))
    partial, dwv = tensor(np.zeros((batch, slots), np.float32)), tensor(np.zeros(slots, np.float32))
    kernels["fwd"](tensor(x), tensor(ptr), tensor(coff), tensor(wv),
                   tensor(np.zeros((spec.out_blocks, spec.lanes), np.float32)), y)
    kernels["wpart"](tensor(x), tensor(dy), tensor(entry_owners(ptr, spec)), tensor(coff), tensor(tap_table(spec)),
                     partial)
    kernels["wsum"](partial, dwv)
    kernels["dgrad"](tensor(dy), *[tensor(a) for a in transposed_entries(ptr, coff, spec)], tensor(wv), dx)

    x64 = torch.from_numpy(x).double().requires_grad_()
    w64 = torch.from_numpy(weight).double().requires_grad_()
    y64 = torch.nn.functional.conv2d(x64, w64, stride=stride, padding=1)
    y64.backward(torch.from_numpy(dy).double())
    dw = np.zeros(weight.size)
    dw[index[index >= 0]] = dwv.numpy()[index >= 0]
    kept = (weight != 0).reshape(weight.shape)
    np.testing.assert_allclose(y.numpy(), y64.detach().numpy(), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(dx.numpy(), x64.grad.numpy(), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(dw.reshape(weight.shape), (w64.grad * torch.from_numpy(kept)).numpy(),
                               atol=5e-5, rtol=1e-5)
    if removed < 1:
        assert np.abs(dw.reshape(weight.shape)[kept]).min() > 0  # every kept tap got its gradient
    assert not np.abs(partial.numpy()[:, ~(index >= 0)]).any()  # padded lanes stay zero


def test_gpu_training_kernels_build_with_nvcc_without_spills():
    """The op's four GPU kernels for a ResNet-20 stage-1 layer at batch 128, built for sm_90 with
    nvcc into one device module: no spills to local memory."""
    _, spec, *_ = _training_spec(16, 16, (28, 28), 1, 16, 128, 0.72)
    sources = {"forward": conv_cuda_tvmscript(spec, "forward"),
               "wpart": conv_weight_grad_cuda_tvmscript(spec, "wpart"),
               "wsum": weight_grad_sum_cuda_tvmscript(spec, "wsum"),
               "dgrad": conv_input_grad_cuda_tvmscript(spec, "dgrad")}
    module, report = build_cuda_kernels(sources, "sm_90")
    assert report["spill_bytes"] == 0 and report["fatbin_bytes"] > 0
    assert all(module.implements_function(name) for name in sources)


def test_gpu_pool_and_classifier_kernels_match_torch():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 5, 7, 9)).astype(np.float32)
    w, b = rng.standard_normal((11, 5)).astype(np.float32), rng.standard_normal(11).astype(np.float32)
    cases = [(maxpool_cuda_tvmscript(3, 5, 7, 9, "k", emulate=True), [x], (3, 5, 4, 5),
              torch.nn.functional.max_pool2d(torch.from_numpy(x), 2, ceil_mode=True)),
             (avgpool_cuda_tvmscript(3, 5, 7, 9, "k", emulate=True), [x], (3, 5), torch.from_numpy(x).mean((2, 3))),
             (dense_cuda_tvmscript(3, 5, 11, True, "k", emulate=True), [x[:, :, 0, 0].copy(), w, b], (3, 11),
              torch.relu(torch.from_numpy(x[:, :, 0, 0]) @ torch.from_numpy(w).T + torch.from_numpy(b)))]
    for source, inputs, shape, expected in cases:
        kernel = build_emulated(tvm.IRModule({"k": tvm.script.from_source(source)})).jit()["k"]
        tensors = [tvm.runtime.tensor(a) for a in [*inputs, np.zeros(shape, np.float32)]]
        kernel(*tensors)
        np.testing.assert_allclose(tensors[-1].numpy(), expected.numpy(), atol=1e-5, rtol=1e-5)


def test_emulated_cuda_model_matches_onnxruntime(exported, fmnist):
    """The whole CUDA lowering (NCHW, batch 3, pattern kernels; pool and classifier by TVM) run on
    the CPU with the GPU kernels' statements."""
    from tvm import relax

    _, result = exported
    lowered = lower_model(import_onnx(result.path, batch=3), TARGETS.get("cuda")(), emulate=True)
    assert lowered.layout.lanes == 4  # the fixture's B=4: four output channels share each pattern
    assert sum(layer.kernel == "pattern" for layer in lowered.layers) == 18
    vm = relax.VirtualMachine(build_emulated(lowered.module), tvm.cpu())
    images = _real_inputs(fmnist, 3)
    got = vm["main"](tvm.runtime.tensor(images)).numpy()
    expected = onnxruntime_session(result.path.read_bytes()).run(None, {"input": images})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_relax_pass_with_gpu_kernels_on_a_hand_built_module():
    """The CPU targets' Relax pass, given the GPU kernels: every conv chain of a batch-2 module
    becomes one NCHW kernel (no pack/unpack), layers matched and chosen as on CPUs."""
    from tvm import relax

    from clicktrain_deploy.compile.schedule import fuse_and_schedule

    weights, biases, metadata = _block()
    module, manifest = rewrite_convs(_module(weights, biases, batch=2), metadata, TARGETS.get("cuda")(),
                                     CudaConvKernels(emulate=True))
    calls = _calls(module)
    assert calls == ["conv"] * 4
    assert {e.layer: e.kernel for e in manifest} == {"conv2d_0": "dense", "conv1": "pattern",
                                                     "conv2d_2": "dense", "conv2": "pattern"}
    assert len({e.function for e in manifest}) == 4  # each layer names its kernel
    module = fuse_and_schedule(tvm.target.Target({"kind": "llvm"}), "cpu", {})(module)
    image = np.random.default_rng(1).standard_normal((2, 3, 9, 11)).astype(np.float32)
    got = relax.VirtualMachine(build_emulated(module), tvm.cpu())["main"](tvm.runtime.tensor(image)).numpy()
    np.testing.assert_allclose(got, _reference(image, weights, biases), atol=1e-4, rtol=1e-4)
    with pytest.raises(CompileError, match="cuda-sm90: a cuda target given cpu conv kernels"):
        from clicktrain_deploy.compile.plan import ConvKernels

        rewrite_convs(_module(weights, biases), metadata, TARGETS.get("cuda")(), ConvKernels())


def _tiny_vgg(path):
    """Conv, ReLU, 2x2 max pool to a 1x1 map, Flatten, Gemm: the VGG ops ResNets do not use."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(6)
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [8, 3, 3, 3], rng.standard_normal(216).astype(np.float32)),
             helper.make_tensor("b", TensorProto.FLOAT, [8], rng.standard_normal(8).astype(np.float32)),
             helper.make_tensor("fw", TensorProto.FLOAT, [5, 8], rng.standard_normal(40).astype(np.float32)),
             helper.make_tensor("fb", TensorProto.FLOAT, [5], rng.standard_normal(5).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "vgg", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 3, 2, 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 5])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)


def test_vgg_ops_lower_emulate_and_build_for_sm80(tmp_path):
    """Max pool and a flatten (TVM's ops, dlight's GPU rules on the device; CPU rules when
    emulated): emulated vs onnxruntime, then built with nvcc for another preset."""
    from tvm import relax

    _tiny_vgg(tmp_path / "vgg.onnx")
    lowered = lower_model(import_onnx(tmp_path / "vgg.onnx"), TARGETS.get("cuda-sm80")(), emulate=True)
    assert [layer.kernel for layer in lowered.layers] == ["dense"]
    x = np.random.default_rng(7).standard_normal((2, 3, 2, 2)).astype(np.float32)
    got = relax.VirtualMachine(build_emulated(lowered.module), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    expected = onnxruntime_session((tmp_path / "vgg.onnx").read_bytes()).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    built = compile_model(tmp_path / "vgg.onnx", "cuda-sm80", tmp_path / "vgg.so", batch=2)
    assert built.manifest["device_code"]["arch"] == "sm_80" and embedded_fatbins(built.library) == 1
    assert built.manifest["check"]["status"] in ("passed", "skipped")  # skipped only without a GPU
    if not gpu_present():
        assert built.manifest["check"]["reason"] == "no NVIDIA GPU on this machine"
    rules = {op["rule"] for op in built.manifest["ops"] if op["kind"] == "tvm"}
    assert rules and all(rule.startswith("dlight.gpu.") for rule in rules)


@pytest.fixture(scope="module")
def sm90_build(exported, tmp_path_factory):
    """The demo model compiled by the CLI for sm_90 at batch 2 with nvcc (one build for the tests)."""
    library = tmp_path_factory.mktemp("cuda") / "model_sm90.so"
    out = CliRunner().invoke(app, ["compile", str(exported[1].path), "--target", "cuda", "--arch", "sm_90",
                                   "--batch", "2", "-o", str(library)])
    assert out.exit_code == 0, out.output
    said = " ".join(out.output.split())  # rich wraps lines
    assert "for cuda-sm90" in said and "18 pattern" in said
    return library


def test_sm90_library_embeds_nvcc_device_code(sm90_build):
    assert sm90_build.read_bytes()[:4] == b"\x7fELF"
    assert embedded_fatbins(sm90_build) == 1  # device code, not CUDA source
    tvm.runtime.load_module(str(sm90_build))  # the CUDA module deserialises
    manifest = json.loads(sm90_build.with_suffix(".json").read_text())
    assert manifest["target"] == "cuda-sm90" and manifest["tvm_target"]["arch"] == "sm_90"
    assert manifest["inputs"][0]["shape"] == [2, 1, 28, 28]
    code = manifest["device_code"]
    assert code["nvcc"].startswith(("12.", "13.")) and code["fatbin_bytes"] > 10_000
    assert code["spill_bytes"] == 0 and 32 < code["max_registers"] <= 255  # accumulators in registers
    generated = [op for op in manifest["ops"] if op["kind"] == "generated"]
    assert len(generated) == 21 and all(op["function"].startswith("conv") for op in generated)  # no pack on NCHW
    assert code["kernels"] == len({op["function"] for op in manifest["ops"]})
    convs = manifest["layers"]
    assert [layer["kernel"] for layer in convs].count("pattern") == 18
    assert all("fewer multiply-adds" in layer["reason"] for layer in convs if layer["kernel"] == "pattern")


def test_cuda_presets_and_errors(exported, tmp_path):
    for arch in CUDA_ARCHS:
        target = tvm.target.Target(TARGETS.get(f"cuda-{arch.replace('_', '')}")().tvm_target)
        assert target.kind.name == "cuda" and str(target.attrs["arch"]) == arch
        assert target.host.kind.name == "llvm"
    assert TARGETS.get("cuda")().tvm_target["arch"] == "sm_90"
    runner = CliRunner()
    model = str(exported[1].path)
    out = runner.invoke(app, ["compile", model, "--target", "cuda", "--arch", "sm_75", "-o", str(tmp_path / "m.so")])
    assert out.exit_code == 2 and "unknown CUDA arch" in out.output and "sm_90" in out.output
    out = runner.invoke(app, ["compile", model, "--target", "x86", "--arch", "sm_90", "-o", str(tmp_path / "m.so")])
    assert out.exit_code == 2 and "only for --target cuda" in out.output
    assert not (tmp_path / "m.so").exists()


@needs_gpu
@pytest.mark.parametrize("sparse", [True, False])
def test_cuda_build_matches_onnxruntime_on_gpu(exported, fmnist, sm90_build, tmp_path, sparse):
    arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
    _, result = exported
    if sparse and arch == "sm_90":
        library = sm90_build
    else:
        target = f"cuda-{arch.replace('_', '')}" if arch in CUDA_ARCHS else "cuda"
        library = compile_model(result.path, target, tmp_path / "model.so", sparse=sparse, batch=2).library
    images = _real_inputs(fmnist, 2)
    expected = onnxruntime_session(result.path.read_bytes()).run(None, {"input": images})[0]
    np.testing.assert_allclose(run_on_cuda(library, images), expected, atol=1e-4, rtol=1e-4)
