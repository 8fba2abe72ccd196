"""Networks: published layouts and parameter counts, attention layout, forced WN, dropout, precision, compile."""
import math
import time

import pytest
import torch
from torch.nn import functional as F

from sctlib.config import ConfigError, NetConfig
from sctlib.networks import NET_PRESETS, build_network, count_params, record_dropout, replay_dropout
from sctlib.networks.ddpmpp import Conv2d, DDPMpp, UNetBlock
from sctlib.networks.edm2 import Block, EDM2UNet, MPConv, mp_cat, mp_silu, mp_sum, normalize
from sctlib.networks.layers import Dropout, PositionalEmbedding, interleaved_attention


def _meta(cfg):
    with torch.device("meta"):  # shapes only: the 1.1B-parameter XL costs no memory or time
        return build_network(cfg)


def _inputs(cfg, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    if cfg.arch == "mlp":
        x = torch.randn(B, cfg.img_resolution, generator=g)
    else:
        x = torch.randn(B, cfg.img_channels, cfg.img_resolution, cfg.img_resolution, generator=g)
    sigma = torch.exp(torch.randn(B, generator=g))
    labels = torch.arange(B) % cfg.label_dim if cfg.label_dim else None
    return x, sigma, labels


def _perturb(net, scale=0.2):
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.add_(scale * torch.randn_like(p)) if p.ndim else p.fill_(1.0)


# ---------------------------------------------------------------- published layouts and counts

def test_ddpmpp_cifar10_count_keys_and_shapes():
    net = _meta(NET_PRESETS["ddpmpp-cifar10"])
    assert count_params(net) == 55_732_739
    sd = net.state_dict()
    assert len(sd) == 424 and all(k.startswith("model.") for k in sd)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["model.enc.16x16_block0.qkv.weight"] == (768, 256, 1, 1)
    assert shapes["model.dec.32x32_aux_conv.weight"] == (3, 256, 3, 3)
    assert shapes["model.map_layer0.weight"] == (512, 128)
    assert shapes["model.enc.32x32_conv.weight"] == (128, 3, 3, 3)
    assert shapes["model.enc.16x16_down.conv0.resample_filter"] == (1, 1, 2, 2)
    assert shapes["model.dec.32x32_block4.conv0.weight"] == (256, 384, 3, 3)  # 384 -> 256 in the last block
    assert sum(k.endswith("resample_filter") for k in sd) == 8
    # attention only where the published model has it
    attn = sorted(k.split(".")[2] for k in sd if k.endswith("qkv.weight"))
    assert attn == sorted(["16x16_block0", "16x16_block1", "16x16_block2", "16x16_block3", "8x8_in0",
                           "16x16_block4"])
    assert "model.map_augment.weight" not in sd


@pytest.mark.parametrize("size,expected", [("s", 280_209_253), ("m", 497_803_045), ("l", 777_492_197),
                                           ("xl", 1_119_276_709)])
def test_edm2_img64_counts(size, expected):
    net = _meta(NET_PRESETS[f"edm2-img64-{size}"])
    assert count_params(net) == expected
    sd = net.state_dict()
    assert len(sd) == 200 and all(k.startswith("unet.") for k in sd)
    assert not any(k.endswith("bias") for k in sd)


def test_edm2_s_key_shapes():
    sd = _meta(NET_PRESETS["edm2-img64-s"]).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["unet.emb_label.weight"] == (768, 1000)
    assert shapes["unet.enc.64x64_conv.weight"] == (192, 4, 3, 3)
    assert shapes["unet.out_gain"] == ()
    assert shapes["unet.emb_fourier.freqs"] == (192,) and shapes["unet.emb_fourier.phases"] == (192,)
    assert shapes["unet.emb_noise.weight"] == (768, 192)
    assert shapes["unet.out_conv.weight"] == (3, 192, 3, 3)
    assert shapes["unet.enc.16x16_block0.attn_qkv.weight"] == (3 * 576, 576, 1, 1)
    assert shapes["unet.dec.8x8_block0.emb_linear.weight"] == (768, 768)
    assert list(sd)[:3] == ["unet.out_gain", "unet.emb_fourier.freqs", "unet.emb_fourier.phases"]
    # attention blocks: enc at 16 and 8, dec in0 and every dec block at 16 and 8
    attn = {".".join(k.split(".")[1:3]) for k in sd if k.endswith("attn_qkv.weight")}
    assert len(attn) == 3 + 3 + 1 + 4 + 4
    # heads of 64 channels: 9 at 16x16 (576 ch), 12 at 8x8 (768 ch)
    net = _meta(NET_PRESETS["edm2-img64-s"])
    assert net.unet.enc["16x16_block0"].num_heads == 9 and net.unet.enc["8x8_block0"].num_heads == 12


def test_tiny_presets_small_and_run():
    torch.manual_seed(0)
    for name in ("ddpmpp-tiny", "edm2-tiny", "mlp-toy"):
        cfg = NET_PRESETS[name]
        net = build_network(cfg).eval()
        assert count_params(net) < 1_000_000, name
        x, sigma, labels = _inputs(cfg)
        y = net(x, sigma, labels)
        assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all(), name


def test_build_network_errors():
    with pytest.raises(ConfigError, match="ddpmpp"):
        build_network(NetConfig(arch="resnet"))
    with pytest.raises(ConfigError, match="valid presets"):
        build_network("nope")
    with pytest.raises(ValueError, match="divisible"):
        build_network(NetConfig(arch="ddpmpp", img_resolution=10, channel_mult=(1, 2, 2)))


def test_conditional_labels_matter_and_are_required():
    torch.manual_seed(0)
    cfg = NET_PRESETS["edm2-tiny"]
    net = build_network(cfg).eval()
    with torch.no_grad():  # out_gain starts at 0 (output = c_skip x); give it a value so labels show
        net.unet.out_gain.fill_(1.0)
        for m in net.modules():
            if isinstance(m, Block):
                m.emb_gain.fill_(1.0)
    x, sigma, _ = _inputs(cfg, B=2)
    a = net(x, sigma, torch.tensor([0, 0]))
    b = net(x, sigma, torch.tensor([0, 1]))
    assert torch.allclose(a[0], b[0]) and (a[1] - b[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="label"):
        net(x, sigma)


# ---------------------------------------------------------------- attention layout

def _manual_attention(qkv, heads, qk_norm=False):
    """Float64 reference: channel h*3c + j*3 + s holds component s (q, k, v) of channel j of head h."""
    B, C3, H, W = qkv.shape
    c = C3 // (3 * heads)
    out = torch.zeros(B, heads * c, H * W, dtype=torch.float64)
    flat = qkv.reshape(B, C3, H * W).double()
    for h in range(heads):
        rows = lambda s: [h * 3 * c + j * 3 + s for j in range(c)]
        q, k, v = flat[:, rows(0)], flat[:, rows(1)], flat[:, rows(2)]
        if qk_norm:  # EDM2: unit RMS over the c channels of each head, eps 1e-4
            q, k, v = (t / (1e-4 + t.square().mean(1, keepdim=True).sqrt()) for t in (q, k, v))
        w = torch.softmax(torch.einsum("bcq,bck->bqk", q, k) / math.sqrt(c), dim=2)
        out[:, h * c:(h + 1) * c] = torch.einsum("bqk,bck->bcq", w, v)
    return out.reshape(B, heads * c, H, W)


def test_interleaved_qkv_layout():
    torch.manual_seed(0)
    qkv = torch.randn(2, 3 * 8, 3, 3, dtype=torch.float64)
    for heads in (1, 2):
        got = interleaved_attention(qkv, heads)
        assert torch.allclose(got, _manual_attention(qkv, heads), atol=1e-10)
    # the stacked [Q; K; V] reading gives a different answer, so the test can tell the layouts apart
    q, k, v = qkv.reshape(2, 3, 8, 9).unbind(1)
    w = torch.softmax(torch.einsum("bcq,bck->bqk", q, k) / math.sqrt(8), dim=2)
    stacked = torch.einsum("bqk,bck->bcq", w, v).reshape(2, 8, 3, 3)
    assert (stacked - interleaved_attention(qkv, 1)).abs().max() > 0.1


def test_ddpmpp_block_attention_matches_reference():
    torch.manual_seed(0)
    blk = UNetBlock(8, 8, 16, attention=True).double().eval()
    with torch.no_grad():
        for p in blk.parameters():  # move off the ~0 init so the attention branch is visible
            p.add_(0.3 * torch.randn_like(p))
    x, emb = torch.randn(2, 8, 4, 4, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    full = blk(x, emb)
    blk.num_heads = 0
    h = blk(x, emb)  # the block output before its attention step
    ref = (blk.proj(_manual_attention(blk.qkv(blk.norm2(h)), 1)) + h) * math.sqrt(0.5)
    assert torch.allclose(full, ref, atol=1e-10)
    assert (full - h).abs().max() > 1e-2


def test_edm2_block_attention_matches_reference():
    torch.manual_seed(0)
    blk = Block(128, 128, 32, flavor="dec", attention=True, channels_per_head=64).double().eval()
    x, emb = torch.randn(2, 128, 3, 3, dtype=torch.float64), torch.randn(2, 32, dtype=torch.float64)
    full = blk(x, emb)
    assert blk.num_heads == 2
    blk.num_heads = 0
    h = blk(x, emb)
    ref = mp_sum(h, blk.attn_proj(_manual_attention(blk.attn_qkv(h), 2, qk_norm=True)), 0.3)
    assert torch.allclose(full, ref, atol=1e-10)


# ---------------------------------------------------------------- EDM2 magnitude preservation and forced WN

def test_mp_ops_preserve_magnitude():
    torch.manual_seed(0)
    a, b = torch.randn(2, 200_000, dtype=torch.float64)
    for t in (0.3, 0.5):
        assert abs(mp_sum(a, b, t).square().mean().item() - 1) < 0.02
    cat = mp_cat(torch.randn(4, 16, 100, 100), torch.randn(4, 48, 100, 100), t=0.5)
    assert abs(cat.square().mean().item() - 1) < 0.02
    # the two halves contribute equally (balance 0.5) although their widths differ 1:3
    assert abs(cat[:, :16].square().sum() / cat[:, 16:].square().sum() - 1) < 0.05
    assert abs(mp_silu(a).square().mean().item() - 1) < 0.02  # 0.596 = E[silu(z)^2]^0.5
    w = normalize(torch.randn(5, 7, 3, 3) * 10)
    assert torch.allclose(w.square().mean(dim=(1, 2, 3)), torch.ones(5), atol=1e-3)


def test_forced_weight_normalisation_only_with_grad_in_train_mode():
    torch.manual_seed(0)
    conv = MPConv(4, 6, [3, 3])
    with torch.no_grad():
        conv.weight.mul_(3.0)
    x = torch.randn(2, 4, 5, 5)
    w0 = conv.weight.detach().clone()
    conv.eval()
    conv(x)
    assert torch.equal(conv.weight, w0)  # eval: never renormalised
    conv.train()
    with torch.no_grad():
        conv(x)
    assert torch.equal(conv.weight, w0)  # ECT/SCT target pass: no in-place renormalisation
    y_grad = conv(x)  # student pass: renormalises in place
    assert not torch.equal(conv.weight, w0)
    rms = conv.weight.detach().square().mean(dim=(1, 2, 3)).sqrt()
    assert torch.allclose(rms, torch.ones(6), atol=1e-3)
    w1 = conv.weight.detach().clone()
    with torch.no_grad():
        y_target = conv(x)  # the target pass that follows sees the student's effective weight exactly
    assert torch.equal(conv.weight, w1) and torch.equal(y_grad, y_target)
    y_grad.sum().backward()  # the target pass left the saved weight untouched, so backward works
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    y_again = conv(x)  # a second grad pass renormalises again; normalize() is not exactly idempotent
    assert not torch.equal(y_again, y_target) and torch.allclose(y_again, y_target, atol=1e-3)


def test_mpfourier_buffers_persist_and_load():
    torch.manual_seed(0)
    a = build_network("edm2-tiny").eval()
    torch.manual_seed(1)
    b = build_network("edm2-tiny").eval()
    assert "unet.emb_fourier.freqs" in a.state_dict() and "unet.emb_fourier.phases" in a.state_dict()
    for net in (a, b):
        with torch.no_grad():
            net.unet.out_gain.fill_(1.0)
    x, sigma, labels = _inputs(NET_PRESETS["edm2-tiny"])
    assert not torch.allclose(a(x, sigma, labels), b(x, sigma, labels))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x, sigma, labels), b(x, sigma, labels))


# ---------------------------------------------------------------- dropout

def test_dropout_by_resolution():
    net = build_network(NetConfig(arch="edm2", img_resolution=32, img_channels=3, model_channels=32,
                                  channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(), dropout=0.3,
                                  dropout_res=16))
    ps = {name: m.dropout.p for name, m in net.unet.enc.items() if hasattr(m, "dropout")}
    ps.update({"dec." + name: m.dropout.p for name, m in net.unet.dec.items()})
    assert ps["32x32_block0"] == 0.0 and ps["dec.32x32_block1"] == 0.0
    assert ps["16x16_down"] == 0.3 and ps["16x16_block0"] == 0.3 and ps["8x8_block0"] == 0.3
    assert ps["dec.8x8_in0"] == 0.3 and ps["dec.16x16_up"] == 0.3
    every = build_network(NET_PRESETS["ddpmpp-tiny"])
    assert {m.p for m in every.modules() if isinstance(m, Dropout)} == {0.1}


@pytest.mark.parametrize("name", ["ddpmpp-tiny", "edm2-tiny", "mlp-toy"])
def test_shared_dropout_masks_between_student_and_target(name):
    torch.manual_seed(0)
    cfg = NET_PRESETS[name]
    if cfg.dropout == 0:
        from dataclasses import replace
        cfg = replace(cfg, dropout=0.3)
    net = build_network(cfg).train()
    _perturb(net)  # move off the near-zero / zero inits so that dropout shows in the output
    x, sigma, labels = _inputs(cfg)
    with record_dropout(net):
        student = net(x, sigma, labels)
    with replay_dropout(net), torch.no_grad():
        target = net(x, sigma, labels)
    assert torch.allclose(student, target, atol=1e-5)
    with torch.no_grad():
        fresh = net(x, sigma, labels)  # new masks
    assert (fresh - student).abs().max() > 1e-4


# ---------------------------------------------------------------- precision, memory format, compile

@pytest.mark.parametrize("name", ["ddpmpp-tiny", "edm2-tiny"])
def test_bf16_autocast_close_to_fp32(name):
    torch.manual_seed(0)
    cfg = NET_PRESETS[name]
    net = build_network(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(1.0)  # EDM2 gains start at 0, which would hide the network
    x, sigma, labels = _inputs(cfg, B=4)
    ref = net(x, sigma, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(x, sigma, labels)
    assert low.dtype == torch.float32  # Precond returns fp32 D
    c_skip = 0.25 / (sigma.reshape(-1, 1, 1, 1) ** 2 + 0.25)
    F_ref = ref - c_skip * x  # the network's contribution c_out F, the part computed in bf16
    err = (low - ref).norm() / F_ref.norm()
    # measured relative RMS error: ~0.006 (ddpmpp-tiny), ~0.012 (edm2-tiny); bf16 has 8 mantissa bits
    assert torch.isfinite(low).all() and err < 0.03, err


@pytest.mark.parametrize("name", ["ddpmpp-tiny", "edm2-tiny"])
def test_channels_last_matches(name):
    torch.manual_seed(0)
    cfg = NET_PRESETS[name]
    net = build_network(cfg).eval()
    x, sigma, labels = _inputs(cfg)
    ref = net(x, sigma, labels)
    got = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), sigma, labels)
    assert torch.allclose(ref, got, atol=1e-5)


def test_backward_in_train_mode():
    torch.manual_seed(0)
    for name in ("ddpmpp-tiny", "edm2-tiny"):
        cfg = NET_PRESETS[name]
        net = build_network(cfg).train()
        x, sigma, labels = _inputs(cfg)
        net(x, sigma, labels).square().mean().backward()
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name


def test_positional_embedding_layout():
    c = torch.tensor([0.3, -1.2], dtype=torch.float32)
    emb = PositionalEmbedding(8)(c).double()
    freqs = (1 / 10000) ** (torch.arange(4, dtype=torch.float64) / 3)  # endpoint=True
    arg = c.double()[:, None] * freqs
    assert torch.allclose(emb, torch.cat([arg.sin(), arg.cos()], 1), atol=1e-6)


def test_ddpmpp_resampling_filters():
    x = torch.randn(1, 2, 4, 4)
    down = Conv2d(2, 2, 0, down=True)(x)
    assert torch.allclose(down, F.avg_pool2d(x, 2), atol=1e-6)
    up = Conv2d(2, 2, 0, up=True)(x)
    assert torch.allclose(up, F.interpolate(x, scale_factor=2, mode="nearest"), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["ddpmpp", "edm2"])
def test_torch_compile_matches_eager(arch):
    # One resolution level with attention: the same code path as the presets, compiled in one graph.
    # measured (2 cores): 30-50 s with a cold inductor cache, ~6 s warm; max |diff| <= 1.5e-8
    torch.manual_seed(0)
    cfg = NetConfig(arch=arch, img_resolution=8, img_channels=3, model_channels=32 if arch == "ddpmpp" else 64,
                    channel_mult=(1,), num_blocks=1, attn_resolutions=(8,))
    net = build_network(cfg).eval()
    _perturb(net)
    x, sigma, _ = _inputs(cfg, B=2)
    t0 = time.time()
    with torch.no_grad():
        ref = net(x, sigma)
        got = torch.compile(net, fullgraph=True)(x, sigma)  # fullgraph: fails on any graph break
    assert torch.allclose(ref, got, atol=1e-5), (ref - got).abs().max()
    assert time.time() - t0 < 90


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["ddpmpp", "edm2"])
def test_compiled_network_records_and_replays_its_dropout_masks(arch):
    """ECT / SCT evaluate student and target with one dropout mask (record, then replay). Under torch.compile
    (the presets compile the network on CUDA) the masks come from compiled code: the masks recorded there
    must be the ones the compiled forward applied (eager replaying them gives the compiled student), and the
    compiled replay must give the same output again."""
    torch.manual_seed(0)
    cfg = NetConfig(arch=arch, img_resolution=8, img_channels=3, model_channels=32 if arch == "ddpmpp" else 64,
                    channel_mult=(1,), num_blocks=1, attn_resolutions=(8,), dropout=0.3,
                    **({"dropout_res": 8} if arch == "edm2" else {}))
    net = build_network(cfg).train()
    _perturb(net)
    x, sigma, _ = _inputs(cfg, B=2)
    # static shapes: after the other compile tests in this process, Dynamo would mark the changed sizes dynamic, and
    # CPU Inductor (torch 2.14) fails on this graph with symbolic sizes (the trainer's shapes never change)
    torch._dynamo.reset()
    compiled = torch.compile(net, dynamic=False)
    with record_dropout(net):
        student = compiled(x, sigma)
    with replay_dropout(net), torch.no_grad():
        eager = net(x, sigma)  # the recorded masks, applied by the eager code
    # compiled vs eager arithmetic alone differs by up to ~2e-5 here (fp32, fused reductions); other masks by > 1e-2
    assert torch.allclose(student, eager, atol=1e-4), (student - eager).abs().max()
    with record_dropout(net):
        student2 = compiled(x, sigma)
    with replay_dropout(net), torch.no_grad():
        target = compiled(x, sigma)
    assert torch.allclose(student2, target, atol=1e-4), (student2 - target).abs().max()
    assert (student2 - student).abs().max() > 1e-2  # a new recording draws new masks
    # the compiled masks follow the global seed (the trainer seeds every step from (seed, images seen)), so a
    # compiled run repeats its draws when resumed with the same settings
    from sctlib.networks.layers import Dropout
    masks = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        with record_dropout(net):
            compiled(x, sigma)
        masks.append([m.clone() for d in net.modules() if isinstance(d, Dropout) for m in d._masks])
    assert masks[0] and all(torch.equal(a, b) for a, b in zip(masks[0], masks[1]))
    assert not all(torch.equal(a, b) for a, b in zip(masks[0], masks[2]))
