"""Tests of mask.models: Table 8 parameter counts, shapes, padding-mask semantics, I/O."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mask.config import ModelConfig
from mask.models import (
    FRM,
    MTM,
    PAE,
    MaskNet,
    ModelInputError,
    PAEFileError,
    PrototypeTable,
    SelfAttentionBlock,
    build_model,
    count_parameters,
    load_pae,
    save_pae,
)

M, Z, N, H = 24, 16, 12, 4  # tiny sizes for behaviour tests


def attn_params(d: int) -> int:
    return 4 * d * d + 4 * d  # Q, K, V, O weights and biases


def linear(i: int, o: int) -> int:
    return i * o + o


@pytest.fixture
def net() -> MaskNet:
    torch.manual_seed(0)
    return MaskNet(M, Z, N, num_heads=H, pae_layers=2)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(3, 5, M, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return r, mask


# ---------------------------------------------------------------------------------------------- sizes


def test_parameter_counts_against_table8():
    net = MaskNet(2048, 512, 300, num_heads=4, pae_layers=3)
    pae, frm, mtm = (count_parameters(m) for m in (net.pae, net.frm, net.mtm))
    # exact counts of this implementation (Table 8 layout + documented extras)
    ln = lambda d: 2 * d  # noqa: E731
    assert pae == linear(2048, 512) + 3 * (attn_params(512) + ln(512)) + ln(512) + linear(512, 512)
    assert frm == linear(512, 512) + attn_params(512) + ln(512) + linear(512, 2048)
    assert mtm == linear(512, 300) + 3 * (attn_params(300) + ln(300)) + 2 * linear(300, 300)
    assert (pae, frm, mtm) == (4_467_712, 2_364_928, 1_419_900)
    # Without the extras (log σ² head, pre-norm LayerNorms) each is within 2 % of Table 12's totals,
    # whose per-layer entries are rounded to 0.01M before summing (MTM: 3 × 0.37M vs 0.361M exact).
    core_pae = pae - linear(512, 512) - 3 * ln(512)
    core_frm = frm - ln(512)
    core_mtm = mtm - 3 * ln(300)
    for ours, paper in ((core_pae, 4.21e6), (core_frm, 2.36e6), (core_mtm, 1.44e6)):
        assert abs(ours - paper) / paper < 0.02, (ours, paper)
    # With the extras: PAE +6.3 % (the log σ² head Table 8 leaves out), FRM and MTM unchanged within 2 %.
    assert abs(pae - 4.21e6) / 4.21e6 < 0.07
    assert abs(frm - 2.36e6) / 2.36e6 < 0.02 and abs(mtm - 1.44e6) / 1.44e6 < 0.02
    # Table 8's attention row: 1.05M at d=512, 0.36M at d=300
    assert count_parameters(net.pae.blocks[0].attn) == attn_params(512) == 1_050_624
    assert count_parameters(net.mtm.sa1.attn) == attn_params(300) == 361_200


def test_build_model_from_config():
    cfg = ModelConfig(feature_dim=M, latent_dim=Z, word_dim=N, num_heads=H, pae_layers=1)
    net = build_model(cfg)
    assert isinstance(net, MaskNet) and len(net.pae.blocks) == 1
    assert net.pae.sizes == {"feature_dim": M, "latent_dim": Z, "num_heads": H, "num_layers": 1}


def test_heads_must_divide():
    with pytest.raises(ModelInputError, match="word_dim=10"):
        MTM(latent_dim=16, word_dim=10, num_heads=4)
    with pytest.raises(ModelInputError, match="latent_dim=18"):
        PAE(feature_dim=8, latent_dim=18, num_heads=4)


# ---------------------------------------------------------------------------------------------- shapes


def test_shapes_and_finite(net):
    r, mask = _batch()
    out = net(r, mask)
    assert out["mu"].shape == out["logvar"].shape == out["z"].shape == (3, 5, Z)
    assert out["r_rec"].shape == (3, 5, M) and out["w_pred"].shape == (3, 5, N)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_bad_inputs(net):
    r, mask = _batch()
    with pytest.raises(ModelInputError, match="last dimension 23"):
        net(r[..., :-1], mask)
    with pytest.raises(ModelInputError, match="bool"):
        net(r, mask.long())
    with pytest.raises(ModelInputError, match="mask has shape"):
        net(r, mask[:, :4])
    with pytest.raises(ModelInputError, match=r"\(B, R, 24\)"):
        net(r[0], mask[0])


# ---------------------------------------------------------------------------------------------- mask semantics


def test_padded_inputs_do_not_change_real_outputs(net):
    r, mask = _batch()
    r2 = r.clone()
    r2[~mask] = torch.randn(int((~mask).sum()), M) * 100
    r2[0, 4] = float("nan")  # even non-finite garbage in a padded slot
    r2[1, 2] = float("inf")
    torch.manual_seed(1)
    a = net(r, mask)
    torch.manual_seed(1)
    b = net(r2, mask)
    for k in a:
        assert torch.isfinite(b[k]).all(), k
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_padded_outputs_are_zero(net):
    r, mask = _batch()
    out = net(r, mask)
    for k, v in out.items():
        assert (v[~mask] == 0).all(), k
        assert (v[mask].abs().sum(-1) > 0).all(), k


def test_matches_per_image_reference(net):
    """Naive reference: each image alone, only its real regions, no padding."""
    r, mask = _batch()
    out = net(r, mask, sample=False)
    for b in range(r.shape[0]):
        n = int(mask[b].sum())
        ref = net(r[b:b + 1, :n], torch.ones(1, n, dtype=torch.bool), sample=False)
        for k in out:
            torch.testing.assert_close(out[k][b, :n], ref[k][0], msg=k)


def test_attention_is_within_image(net):
    r, mask = _batch()
    r2 = r.clone()
    r2[2] += 5.0  # change every region of image 2
    a, b = net(r, mask, sample=False), net(r2, mask, sample=False)
    for k in a:
        torch.testing.assert_close(a[k][:2], b[k][:2])
        assert not torch.allclose(a[k][2], b[k][2])


def test_permutation_equivariant_over_regions(net):
    r, mask = _batch()
    perm = torch.tensor([3, 0, 4, 2, 1])
    a = net(r[2:3], mask[2:3], sample=False)
    b = net(r[2:3, perm], mask[2:3, perm], sample=False)
    for k in a:
        torch.testing.assert_close(a[k][:, perm], b[k], msg=k)


def test_image_with_no_real_region(net):
    r, mask = _batch()
    mask = mask.clone()
    mask[1] = False
    out = net(r, mask)
    for k, v in out.items():
        assert torch.isfinite(v).all(), k
        assert (v[1] == 0).all(), k
    loss = sum(v.sum() for v in out.values())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_all_images_empty(net):
    r, _ = _batch()
    out = net(r, torch.zeros(3, 5, dtype=torch.bool))
    assert all((v == 0).all() for v in out.values())


def test_one_region_and_batch_of_one(net):
    r = torch.randn(1, 1, M)
    mask = torch.ones(1, 1, dtype=torch.bool)
    out = net(r, mask)
    assert out["mu"].shape == (1, 1, Z) and torch.isfinite(out["r_rec"]).all()
    # one region attends only to itself: softmax weight 1 → attention output = V·O projection of itself
    blk = net.pae.blocks[0]
    x = torch.randn(1, 1, Z)
    h = blk.norm(x)
    wv = blk.attn.in_proj_weight[2 * Z:]
    bv = blk.attn.in_proj_bias[2 * Z:]
    expect = x + blk.attn.out_proj(h @ wv.T + bv)
    torch.testing.assert_close(blk(x, torch.zeros(1, 1, dtype=torch.bool)), expect)


def test_block_matches_naive_attention():
    """SelfAttentionBlock against explicit per-head softmax attention with a padding mask."""
    torch.manual_seed(3)
    blk = SelfAttentionBlock(8, num_heads=2)
    x = torch.randn(2, 4, 8)
    kpm = torch.tensor([[False, False, True, True], [False, False, False, False]])
    got = blk(x, kpm)
    w_in, b_in = blk.attn.in_proj_weight, blk.attn.in_proj_bias
    for b in range(2):
        h = blk.norm(x[b])
        q, k, v = (h @ w_in[i * 8:(i + 1) * 8].T + b_in[i * 8:(i + 1) * 8] for i in range(3))
        heads = []
        for hd in range(2):
            sl = slice(hd * 4, hd * 4 + 4)
            rows = []
            for i in range(4):
                scores = [float((q[i, sl] @ k[j, sl]).detach()) / math.sqrt(4) for j in range(4)]
                keep = [j for j in range(4) if not kpm[b, j]]
                mx = max(scores[j] for j in keep)
                e = {j: math.exp(scores[j] - mx) for j in keep}
                tot = sum(e.values())
                rows.append(sum((e[j] / tot) * v[j, sl] for j in keep))
            heads.append(torch.stack(rows))
        ref = x[b] + blk.attn.out_proj(torch.cat(heads, dim=1))
        torch.testing.assert_close(got[b], ref, atol=1e-5, rtol=1e-5)


def test_eval_fast_path_matches_train_mode(net):
    r, mask = _batch()
    a = net(r, mask, sample=False)
    net.eval()
    with torch.no_grad():
        b = net(r, mask, sample=False)
    for k in a:
        torch.testing.assert_close(a[k].detach(), b[k], atol=1e-5, rtol=1e-5, msg=k)


def test_deterministic_under_seed(net):
    r, mask = _batch()
    torch.manual_seed(7)
    a = net(r, mask)
    torch.manual_seed(7)
    b = net(r, mask)
    torch.manual_seed(8)
    c = net(r, mask)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert not torch.allclose(a["z"], c["z"])
    torch.testing.assert_close(a["mu"], c["mu"])  # only the sample is random
    torch.manual_seed(0)
    n1 = MaskNet(M, Z, N, num_heads=H)
    torch.manual_seed(0)
    n2 = MaskNet(M, Z, N, num_heads=H)
    assert all(torch.equal(p, q) for p, q in zip(n1.parameters(), n2.parameters(), strict=True))


def test_sample_uses_sigma(net):
    r, mask = _batch()
    out = net(r, mask, sample=True)
    det = net(r, mask, sample=False)
    torch.testing.assert_close(det["z"], det["mu"])
    assert not torch.allclose(out["z"][mask], out["mu"][mask])
    # z - mu = exp(logvar / 2) * eps with eps ~ N(0, 1): standardised residuals look standard normal
    eps = ((out["z"] - out["mu"]) / torch.exp(0.5 * out["logvar"]))[mask].detach()
    assert abs(float(eps.mean())) < 0.2 and abs(float(eps.std()) - 1) < 0.2


def test_gradients_reach_every_parameter_and_skip_padding(net):
    r, mask = _batch()
    r = r.clone().requires_grad_(True)
    out = net(r, mask)
    sum(v.pow(2).sum() for v in out.values()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert (r.grad[~mask] == 0).all()


def test_frm_and_mtm_alone():
    torch.manual_seed(0)
    z = torch.randn(2, 3, Z)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert FRM(Z, M, H)(z, mask).shape == (2, 3, M)
    assert MTM(Z, N, H)(z, mask).shape == (2, 3, N)


def test_prototype_table():
    torch.manual_seed(0)
    t = PrototypeTable(7, Z)
    assert t().shape == (7, Z) and t.weight.requires_grad
    torch.testing.assert_close(t(torch.tensor([2, 2, 5])), t.weight[[2, 2, 5]])
    with pytest.raises(ModelInputError):
        PrototypeTable(0, Z)


# ---------------------------------------------------------------------------------------------- save / load


def test_save_load_roundtrip(net, tmp_path):
    net.eval()
    data = save_pae(net.pae)
    path = tmp_path / "pae.safetensors"
    save_pae(net.pae, path)
    assert path.read_bytes() == data == save_pae(net.pae)  # deterministic bytes
    r, mask = _batch()
    with torch.no_grad():
        ref = net.pae(r, mask)
    for loaded in (load_pae(data, {"feature_dim": M, "latent_dim": Z}), load_pae(path)):
        assert not loaded.training and loaded.sizes == net.pae.sizes
        with torch.no_grad():
            got = loaded(r, mask)
        torch.testing.assert_close(got, ref)


def test_load_refuses_other_sizes(net):
    data = save_pae(net.pae)
    with pytest.raises(PAEFileError, match=r"knowledge\.st: latent_dim is 16 in the file, expected 32"):
        load_pae(data, {"latent_dim": 32}, name="knowledge.st")
    with pytest.raises(PAEFileError, match="unknown expected size 'width'"):
        load_pae(data, {"width": 3})


def test_load_names_mismatched_tensors(net):
    from safetensors.torch import save

    sd = {k: v.clone() for k, v in net.pae.state_dict().items()}
    sd["fc.weight"] = torch.zeros(Z, M + 1)
    del sd["norm.bias"]
    sd["extra"] = torch.zeros(1)
    meta = {"mask-pae": json.dumps({"format_version": "1", **net.pae.sizes})}
    with pytest.raises(PAEFileError) as e:
        load_pae(save(sd, metadata=meta), name="bad.st")
    msg = str(e.value)
    assert "bad.st" in msg and "missing tensors ['norm.bias']" in msg and "unexpected tensors ['extra']" in msg
    assert "fc.weight: file (16, 25) vs model (16, 24)" in msg


def test_load_refuses_foreign_or_corrupt_files(tmp_path):
    from safetensors.torch import save

    with pytest.raises(PAEFileError, match="no 'mask-pae' metadata entry"):
        load_pae(save({"a": torch.zeros(2)}))
    with pytest.raises(PAEFileError, match="not a safetensors file"):
        load_pae(b"\x01\x00")
    with pytest.raises(PAEFileError, match="cannot read"):
        load_pae(tmp_path / "missing.st")
    sizes = {"feature_dim": 1, "latent_dim": 4, "num_heads": 1, "num_layers": 0}
    meta = {"mask-pae": json.dumps({"format_version": "9", **sizes})}
    with pytest.raises(PAEFileError, match="format_version '9'"):
        load_pae(save({"a": torch.zeros(2)}, metadata=meta))
    with pytest.raises(PAEFileError, match="metadata is malformed"):
        load_pae(save({"a": torch.zeros(2)}, metadata={"mask-pae": "{not json"}))
