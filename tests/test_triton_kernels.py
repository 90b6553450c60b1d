"""Triton kernels against the reference.

Three ways they run here:
- on CPU tensors in Triton's interpreter: ``test_kernels_under_interpreter`` runs this file in a
  child pytest with ``TRITON_INTERPRET=1`` (it must be set before Triton is imported), where the
  kernel and module tests below run on CPU tensors with blocks of 64;
- on a GPU when there is one (the same tests, on CUDA tensors, autotuned configs);
- compiled ahead of time for sm_90 without a GPU: the matrix kernels must use ``wgmma``.
"""
import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_module_backend_matches_reference, rand

import sparse_sae as S
from sparse_sae import reference as R

triton = pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else None)
kernels = pytest.mark.skipif(DEVICE is None, reason="needs a GPU or TRITON_INTERPRET=1 (run by "
                                                    "test_kernels_under_interpreter)")
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _assert_close(got, exact, same_dtype, dtype, name=""):
    """fp32: close to the exact (float64) result. Half types: at most twice the error of the
    same formula computed by PyTorch in that dtype (plus a small floor); four times for bf16 in
    the interpreter, which casts fp32 to bf16 by truncation instead of round-to-nearest-even."""
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), exact, **TOL[dtype], msg=lambda m: f"{name}: {m}")
        return
    err = (got.double() - exact).abs().max().item()
    ref_err = (same_dtype.double() - exact).abs().max().item()
    factor = 4 if (INTERPRET and DEVICE == "cpu" and dtype == torch.bfloat16) else 2
    assert err <= factor * ref_err + 1e-3 * (1 + exact.abs().max().item()), (name, err, ref_err)


def _to(dtype, *tensors):
    return [t.to(device=DEVICE, dtype=dtype if t.is_floating_point() else t.dtype) for t in tensors]


# ----------------------------------------------------------------------------- the child run
@pytest.mark.skipif(INTERPRET, reason="this is the parent of the interpreter run")
def test_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", SPARSE_SAE_BACKEND="")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert " passed" in res.stdout and " failed" not in res.stdout, res.stdout[-3000:]


# ----------------------------------------------------------------------------- dispatch
@pytest.mark.skipif(INTERPRET, reason="checks dispatch without the interpreter")
def test_triton_backend_dispatch(monkeypatch):
    from sparse_sae.ops._registry import backend_for
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("SPARSE_SAE_BACKEND", raising=False)
    assert [backend_for(op, cuda) for op in ("encode", "penalty_backward", "sparse_decode",
                                             "sparse_decode_backward")] == ["triton"] * 4
    assert backend_for("encode", cpu) != "triton"
    monkeypatch.setenv("SPARSE_SAE_BACKEND", "triton")
    assert backend_for("select", cpu) != "triton"   # selection keeps the device's usual backend
    with pytest.raises(RuntimeError, match="for cpu tensors.*TRITON_INTERPRET=1"):
        backend_for("encode", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_for("encode", cpu) == "triton"


@pytest.mark.skipif(INTERPRET, reason="runs in the parent")
def test_package_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import os, torch, sparse_sae as S\n"
            "from sparse_sae.ops._registry import backend_for\n"
            "S.TopKSAE(8, 30, 3, [S.OffSupportL1(0.1)])(torch.randn(5, 8)).loss.backward()\n"
            "os.environ['SPARSE_SAE_BACKEND'] = 'triton'\n"
            "try:\n    backend_for('encode', torch.device('cuda'))\n"
            "except RuntimeError as e:\n    assert 'triton backend not available' in str(e), e\n    print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPARSE_SAE_BACKEND")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# ----------------------------------------------------------------------------- encode
@kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,D,F", [(1, 70, 3), (67, 45, 130), (130, 129, 65), (200, 64, 300)])
@pytest.mark.parametrize("relu", [True, False])
def test_encode(gen, dtype, B, D, F, relu):
    """Shapes with 1-4 row tiles and 1-5 column tiles: tile groups of 2 in the interpreter, the
    last one short or whole."""
    from sparse_sae.triton_kernels.encode import encode
    x, W, b_enc, b_dec = rand(gen, B, D), rand(gen, F, D) / D ** 0.5, rand(gen, F, scale=0.3), rand(gen, D, scale=0.5)
    x, W, b_enc, b_dec = _to(dtype, x, W, b_enc, b_dec)
    got = encode(x, W, b_enc, b_dec, relu)
    want = R.encode_ref(*(t.double() for t in (x, W, b_enc, b_dec)), relu)   # exact, from the rounded inputs
    assert got.dtype == dtype and got.shape == (B, F)
    torch.testing.assert_close(got.double(), want, **TOL[dtype])


# ----------------------------------------------------------------------------- penalty backward
def _penalty_case(gen, B, F, D, k, dtype, dead_block):
    """Inputs of the penalty backward from a real selection; latents in ``dead_block`` never fire
    (a whole column block inactive) and row 0 has no active entry (its norms are 0)."""
    x, W, b_enc, b_dec = rand(gen, B, D), rand(gen, F, D) / D ** 0.5, rand(gen, F, scale=0.3), rand(gen, D, scale=0.1)
    h = R.encode_ref(x, W, b_enc, b_dec)
    h[:, dead_block] = 0
    h[0] = 0
    values, indices = R.topk_select_ref(h, k)
    active = R.batch_active_ref(values, indices, F)
    x, W, b_dec, h = _to(dtype, x, W, b_dec, h)
    n1, n2 = R.active_row_norms_ref(h, active.to(DEVICE))
    sp_grad = rand(gen, B, k).float() * (values > 0)
    return x, W, b_dec, h, active.to(DEVICE), n1, n2, indices.to(DEVICE), sp_grad.to(DEVICE)


PENALTY_SHAPES = [(67, 200, 70, 5), (1, 130, 65, 130), (90, 70, 129, 17)]
PENALTY_CASES = ([(dtype, shape, "both", steps) for dtype in DTYPES for shape in PENALTY_SHAPES for steps in (True, False)]
                 + [(torch.float32, PENALTY_SHAPES[0], "off", True), (torch.float32, PENALTY_SHAPES[2], "ratio", False),
                    (torch.bfloat16, PENALTY_SHAPES[0], "none", None)])


@kernels
@pytest.mark.parametrize("dtype,shape,terms,sparse_steps", PENALTY_CASES)
def test_penalty_backward(gen, monkeypatch, dtype, shape, terms, sparse_steps):
    """Both ways the sparse part joins the GEMM (one-hot K steps, or a first pass by latent)."""
    B, F, D, k = shape
    from sparse_sae.triton_kernels import penalty_backward as kernel

    from sparse_sae.ops._triton import penalty_backward_triton
    monkeypatch.setattr(kernel, "sparse_steps_pay", lambda *a: sparse_steps)
    monkeypatch.setitem(kernel.INTERPRETER_CONFIG, "SKIP_EMPTY", bool(sparse_steps))   # both loop forms
    x, W, b_dec, h, active, n1, n2, idx, sp_grad = _penalty_case(gen, B, F, D, k, dtype, slice(64, 128))
    coef_off = torch.tensor(0.37, device=DEVICE) if terms in ("both", "off") else None
    coef_ratio = torch.tensor(-0.8, device=DEVICE) if terms in ("both", "ratio") else None
    got = penalty_backward_triton(x, W, b_dec, h, active, n1, n2, idx, sp_grad, coef_off, coef_ratio, 1e-6, False)
    want = R.penalty_backward_ref(*(t.double() for t in (x, W, b_dec, h)), active, n1.double(), n2.double(), idx,
                                  sp_grad.double(), coef_off, coef_ratio, 1e-6, False)
    same = R.penalty_backward_ref(x, W, b_dec, h, active, n1, n2, idx, sp_grad, coef_off, coef_ratio, 1e-6, False)
    for name, g, w, r in zip(("dW_enc", "db_enc", "db_dec"), got, want, same):
        assert g.dtype == dtype, name
        _assert_close(g, w, r, dtype, name)
    if F >= 128:   # the never-active block gets exactly the sparse part: nothing
        assert torch.count_nonzero(got[0][64:128]) == 0


@kernels
@pytest.mark.parametrize("sparse_steps", [True, False])
def test_penalty_backward_fp16_small_coefficients(gen, monkeypatch, sparse_steps):
    """A real run's coef / B (1e-6 to 1e-8) and sparse gradients of the same size are subnormal
    or zero in fp16: the kernel scales each G tile by a power of two before rounding it. Against
    float64; G rounded to fp16 unscaled is off by several percent here."""
    B, F, D, k = 67, 200, 70, 5
    from sparse_sae.triton_kernels import penalty_backward as kernel

    from sparse_sae.ops._triton import penalty_backward_triton
    monkeypatch.setattr(kernel, "sparse_steps_pay", lambda *a: sparse_steps)
    x, W, b_dec, h, active, n1, n2, idx, sp_grad = _penalty_case(gen, B, F, D, k, torch.float16, slice(64, 128))
    sp_grad = sp_grad * 2e-7
    coef_off, coef_ratio = torch.tensor(3e-8, device=DEVICE), torch.tensor(-4e-7, device=DEVICE)
    got = penalty_backward_triton(x, W, b_dec, h, active, n1, n2, idx, sp_grad, coef_off, coef_ratio, 1e-6, False)
    want = R.penalty_backward_ref(*(t.double() for t in (x, W, b_dec, h)), active, n1.double(), n2.double(), idx,
                                  sp_grad.double(), coef_off.double(), coef_ratio.double(), 1e-6, False)
    for name, g, w in zip(("dW_enc", "db_enc"), got, want):
        # the fp16 output itself is subnormal here: its rounding (2^-24) is the floor
        err = (g.double() - w).abs().max().item()
        assert err <= 1e-2 * w.abs().max().item() + 2.0 ** -24, (name, err, w.abs().max().item())


def test_fp16_gradient_scale_bounds_every_entry(gen):
    """The scale keeps the largest possible |G| entry within fp16 and puts it near 2^12; rows with
    n2 = 0 (no active entry) carry no penalty gradient and do not shrink the scale."""
    from sparse_sae.triton_kernels.penalty_backward import FP16_G_TARGET, fp16_gradient_scale
    B, F = 33, 90
    h = torch.relu(rand(gen, B, F, dtype=torch.float64))
    h[0] = 0
    active = torch.rand(F, generator=gen) < 0.7
    n1, n2 = R.active_row_norms_ref(h, active)
    c_off, c_ratio = torch.tensor([2e-7]), torch.tensor([-5e-6])
    sp_grad = rand(gen, B, 4, dtype=torch.float32) * 1e-7
    s = fp16_gradient_scale(n1.float(), n2.float(), c_off, c_ratio, 1e-6, sp_grad)
    assert s.dtype == torch.float32 and s.shape == (1,)
    assert float(torch.log2(s)) == int(torch.log2(s))   # a power of two: scaling is exact
    G = R.penalty_grad_ref(h, active, n1, n2, c_off.double(), c_ratio.double(), 1e-6)
    biggest = max(G.abs().max().item(), sp_grad.abs().max().item())
    assert FP16_G_TARGET / 2 < s.item() * biggest * 4 and s.item() * biggest <= FP16_G_TARGET


# ----------------------------------------------------------------------------- sparse decode
@kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,F,D,k", [(67, 130, 70, 5), (1, 70, 129, 70), (70, 65, 130, 1)])
def test_sparse_decode(gen, dtype, B, F, D, k):
    from sparse_sae.ops._triton import sparse_decode_backward_triton, sparse_decode_triton
    values = rand(gen, B, k).abs()
    values[::3, k // 2] = 0   # zero entries (padding, AuxK with nothing dead) read no decoder row
    indices = torch.randint(0, F, (B, k), generator=gen)
    indices[:, 0] = indices[:, -1]   # a repeated latent in a row sums
    W, b, grad = rand(gen, F, D) / D ** 0.5, rand(gen, D), rand(gen, B, D)
    values, indices, W, b, grad = _to(dtype, values, indices, W, b, grad)
    got = sparse_decode_triton(values, indices, W, b)
    torch.testing.assert_close(got.double(), R.sparse_decode_ref(values.double(), indices, W.double(), b.double()),
                               **TOL[dtype])
    d_values, dW = sparse_decode_backward_triton(grad, values, indices, W)
    want_dv, want_dW = R.sparse_decode_backward_ref(grad.double(), values.double(), indices, W.double())
    torch.testing.assert_close(d_values.double(), want_dv, **TOL[dtype])
    torch.testing.assert_close(dW.double(), want_dW, **TOL[dtype])
    assert d_values.dtype == dtype and dW.dtype == dtype


# ----------------------------------------------------------------------------- the module path
@kernels
@pytest.mark.parametrize("make", [
    lambda: S.TopKSAE(29, 131, 7, [S.OffSupportL1(0.3), S.L1L2Ratio(0.1)], auxk=S.AuxK(k_aux=5, dead_after_tokens=1)),
    lambda: S.TopKSAE(29, 131, 7),
    lambda: S.TopKSAE(29, 70, 70, [S.L1L2Ratio(0.1)]),
    lambda: S.BatchTopKSAE(29, 131, 4, [S.OffSupportL1(0.3), S.DecoderNormL1(0.1)]),
])
def test_module_triton_backend_equals_reference_backend(gen, monkeypatch, make):
    sae = make().to(DEVICE)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(rand(gen, *p.shape, dtype=torch.float32) * 0.3)
        sae.tokens_since_fired.copy_(torch.arange(sae.tokens_since_fired.numel()) % 2)
    x = rand(gen, 45, 29, dtype=torch.float32).to(DEVICE)
    assert_module_backend_matches_reference(sae, x, "triton", monkeypatch, rtol=1e-4, atol=1e-5)


def _soft(make, regime):
    def build():
        sae = make()
        sae.code_regime = regime
        return sae
    return build


@kernels
@pytest.mark.parametrize("regime", ["dense", "sparse"])
@pytest.mark.parametrize("make", [
    lambda: S.ReLUSAE(29, 131, [S.DecoderNormL1(0.1)]),
    lambda: S.JumpReLUSAE(29, 131, [S.L0(0.1), S.DecoderNormL1(0.1)], bandwidth=0.3, init_threshold=0.05),
])
def test_threshold_code_module_triton_backend_equals_reference_backend(gen, monkeypatch, make, regime):
    """ReLU and JumpReLU on the fused threshold code: the Triton encoder, the select op's threshold
    packing, the sparse backward through the Triton penalty kernel's sparse part."""
    sae = _soft(make, regime)().to(DEVICE)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(rand(gen, *p.shape, dtype=torch.float32) * 0.3)
    x = rand(gen, 45, 29, dtype=torch.float32).to(DEVICE)
    assert_module_backend_matches_reference(sae, x, "triton", monkeypatch, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- sm_90 compile
def _compile_for(fn, types, constexprs, num_warps=4, num_stages=3, cc=90):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = fn.arg_names
    sig = {n: ("constexpr" if n in constexprs else types[n]) for n in names}
    # what the JIT assumes for aligned tensors with strides (and D) multiples of 16: without it
    # loads are not vectorised and the K loop is not pipelined
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in constexprs and (n.endswith("_ptr") or n.startswith("stride") or n == "D")}
    src = ASTSource(fn, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(num_warps=num_warps,
                                                                               num_stages=num_stages))


@pytest.mark.skipif(INTERPRET, reason="ahead-of-time compilation, not the interpreter")
@pytest.mark.parametrize("cc,instruction", [(90, "wgmma.mma_async"), (80, "mma.sync")])
def test_encode_compiles_with_tensor_core_instructions(cc, instruction):
    """Hopper: the first autotune config uses wgmma; Ampere: its default config uses mma."""
    from sparse_sae.triton_kernels.encode import ampere_configs, encode_kernel, hopper_configs
    enc = (hopper_configs() if cc == 90 else ampere_configs())[0]
    types = {n: "*bf16" for n in ("x_ptr", "w_ptr", "b_enc_ptr", "b_dec_ptr", "h_ptr")}
    types.update({n: "i32" for n in ("B", "F", "D", "stride_x", "stride_w", "stride_h")})
    k = _compile_for(encode_kernel, types, dict(RELU=True, PRECISION="ieee", UPCAST=False, **enc.kwargs),
                     enc.num_warps, enc.num_stages, cc=cc)
    assert instruction in k.asm["ptx"] and k.asm["cubin"]
    assert "async_copy_global_to_local" in k.asm["ttgir"], "the K loop is not pipelined"


@pytest.mark.skipif(INTERPRET, reason="ahead-of-time compilation, not the interpreter")
@pytest.mark.parametrize("has_off,config,sparse_steps,dtype", [(True, 0, False, "bf16"), (False, 3, True, "bf16"),
                                                                (True, 0, False, "fp16")])
def test_penalty_gemm_compiles_for_sm90_with_wgmma(has_off, config, sparse_steps, dtype):
    """fp16 scales its G tiles (SCALE_G) and must stay on wgmma, pipelined, too."""
    from sparse_sae.triton_kernels.penalty_backward import hopper_configs as pen_configs
    from sparse_sae.triton_kernels.penalty_backward import penalty_grad_gemm_kernel
    pen = pen_configs()[config]
    types = {"h_ptr": f"*{dtype}", "xc_ptr": f"*{dtype}", "active_ptr": "*u8", "n1_ptr": "*fp32", "n2_ptr": "*fp32",
             "coef_off_ptr": "*fp32", "coef_ratio_ptr": "*fp32", "g_scale_ptr": "*fp32", "start_ptr": "*i64", "entry_ptr": "*i64",
             "sp_idx_ptr": "*i64", "sp_grad_ptr": "*fp32", "dw_ptr": f"*{dtype}", "db_ptr": f"*{dtype}",
             "ratio_eps": "fp32"}
    types.update({n: "i32" for n in ("B", "F", "D", "WIDTH", "stride_h", "stride_xc", "stride_dw")})
    consts = dict(pen.kwargs, HAS_OFF=has_off, HAS_RATIO=True, PRECISION="ieee", UPCAST=False,
                  SPARSE_STEPS=sparse_steps, SCALE_G=dtype == "fp16")
    k = _compile_for(penalty_grad_gemm_kernel, types, consts, pen.num_warps, pen.num_stages)
    assert "wgmma.mma_async" in k.asm["ptx"] and k.asm["cubin"]
    if not pen.kwargs["SKIP_EMPTY"]:
        assert "async_copy_global_to_local" in k.asm["ttgir"], "the K loop is not pipelined"


def _spill_stores(ptx: str, cc: int) -> int:
    """Bytes of register spill stores per thread, from ``ptxas -v`` (Triton's own ptxas)."""
    import re
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip(f"no ptxas in this Triton ({ptxas})")
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"-arch=sm_{cc}a" if cc == 90 else f"-arch=sm_{cc}", path, "-o",
                              os.devnull], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", res.stderr + res.stdout))


def _penalty_spill_cases():
    from sparse_sae.triton_kernels.penalty_backward import ampere_configs, fp32_configs, hopper_configs
    cases = [(90, dt, i) for dt in ("bf16", "fp16") for i in range(len(hopper_configs()))]
    cases += [(80, dt, i) for dt in ("bf16", "fp16") for i in range(len(ampere_configs()))]
    cases += [(cc, "fp32", i) for cc in (80, 90) for i in range(len(fp32_configs()))]
    return cases


@pytest.mark.skipif(INTERPRET, reason="ahead-of-time compilation, not the interpreter")
@pytest.mark.parametrize("cc,dtype,index", _penalty_spill_cases())
def test_penalty_gemm_configs_do_not_spill(cc, dtype, index):
    """Every autotune config of the penalty GEMM, with and without the sparse steps, compiles with
    no register spill stores for the architecture and dtype it serves (fp32 with exact and TF32
    products): a spill inside the K loop costs local-memory traffic on every step."""
    from sparse_sae.triton_kernels import penalty_backward as pb
    configs = {90: pb.hopper_configs(), 80: pb.ampere_configs()}[cc] if dtype != "fp32" else pb.fp32_configs()
    c = configs[index]
    types = {"h_ptr": f"*{dtype}", "xc_ptr": f"*{dtype}", "active_ptr": "*u8", "n1_ptr": "*fp32", "n2_ptr": "*fp32",
             "coef_off_ptr": "*fp32", "coef_ratio_ptr": "*fp32", "g_scale_ptr": "*fp32", "start_ptr": "*i64",
             "entry_ptr": "*i64", "sp_idx_ptr": "*i64", "sp_grad_ptr": "*fp32", "dw_ptr": f"*{dtype}",
             "db_ptr": f"*{dtype}", "ratio_eps": "fp32"}
    types.update({n: "i32" for n in ("B", "F", "D", "WIDTH", "stride_h", "stride_xc", "stride_dw")})
    for sparse_steps in (False, True):
        for precision in (("ieee", "tf32") if dtype == "fp32" else ("ieee",)):
            consts = dict(c.kwargs, HAS_OFF=True, HAS_RATIO=True, PRECISION=precision, UPCAST=False,
                          SPARSE_STEPS=sparse_steps, SCALE_G=dtype == "fp16")
            k = _compile_for(pb.penalty_grad_gemm_kernel, types, consts, c.num_warps, c.num_stages, cc=cc)
            assert _spill_stores(k.asm["ptx"], cc) == 0, (c, sparse_steps, precision)


def _encode_config_cases():
    from sparse_sae.triton_kernels.encode import ampere_configs, fp32_configs, hopper_configs
    return ([(90, "bf16", i) for i in range(len(hopper_configs()))] + [(80, "bf16", i) for i in range(len(ampere_configs()))]
            + [(90, "fp32", i) for i in range(len(fp32_configs()))])


@pytest.mark.skipif(INTERPRET, reason="ahead-of-time compilation, not the interpreter")
@pytest.mark.parametrize("cc,dtype,index", _encode_config_cases())
def test_encode_configs_compile_pipelined_without_spills(cc, dtype, index):
    """Every autotune config of the encoder (grouped tile order included) compiles with a
    pipelined K loop, tensor-core instructions for half types and no register spill stores."""
    from sparse_sae.triton_kernels import encode as enc
    configs = {90: enc.hopper_configs(), 80: enc.ampere_configs()}[cc] if dtype != "fp32" else enc.fp32_configs()
    c = configs[index]
    types = {n: f"*{dtype}" for n in ("x_ptr", "w_ptr", "b_enc_ptr", "b_dec_ptr", "h_ptr")}
    types.update({n: "i32" for n in ("B", "F", "D", "stride_x", "stride_w", "stride_h")})
    k = _compile_for(enc.encode_kernel, types, dict(RELU=True, PRECISION="ieee", UPCAST=False, **c.kwargs),
                     c.num_warps, c.num_stages, cc=cc)
    if dtype != "fp32":
        assert ("wgmma.mma_async" if cc == 90 else "mma.sync") in k.asm["ptx"]
    assert "async_copy_global_to_local" in k.asm["ttgir"], "the K loop is not pipelined"
    assert _spill_stores(k.asm["ptx"], cc) == 0, c


@pytest.mark.skipif(INTERPRET, reason="ahead-of-time compilation, not the interpreter")
def test_decoder_kernels_compile_for_sm90():
    from sparse_sae.triton_kernels import sparse_decode as sd
    i32 = "i32"
    k = _compile_for(sd.sparse_decode_kernel, {"val_ptr": "*bf16", "idx_ptr": "*i64", "w_ptr": "*bf16",
                                                "b_ptr": "*bf16", "out_ptr": "*bf16", "B": i32, "K": i32, "D": i32,
                                                "stride_w": i32, "stride_out": i32}, dict(BM=32, BD=256))
    assert k.asm["cubin"]
    k = _compile_for(sd.sparse_decode_dvalues_kernel, {"grad_ptr": "*bf16", "idx_ptr": "*i64", "w_ptr": "*bf16",
                                                        "dval_ptr": "*bf16", "K": i32, "D": i32, "stride_grad": i32,
                                                        "stride_w": i32}, dict(BJ=32, BD=256))
    assert k.asm["cubin"]
    k = _compile_for(sd.accumulate_by_latent_kernel, {"start_ptr": "*i64", "entry_ptr": "*i64", "val_ptr": "*fp32",
                                               "src_ptr": "*bf16", "out_ptr": "*bf16", "sum_ptr": "*bf16", "F": i32,
                                               "D": i32, "WIDTH": i32, "stride_src": i32, "stride_out": i32},
                      dict(HAS_SUM=True, BL=8, BE=16, BD=512))
    assert k.asm["cubin"]
