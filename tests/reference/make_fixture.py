#!/usr/bin/python3
"""Write the parity fixture that tests/test_step.c compares excb.c against.

An independent implementation of ONE ExCB training step, written from the official code's equations as paper_notes.md gives them (equations
E0-E14, section 1.12, Appendix A) in a functional style: parameters live in a dict keyed by the
PyTorch state_dict names that excb.c also uses, and the forward is plain torch.nn.functional calls,
so autograd supplies every gradient. Needs PyTorch only to REGENERATE the fixture; CI never runs it.

    /usr/bin/python3 tests/reference/make_fixture.py            # writes tests/reference/*.bin

Fixture format (little-endian), read by tests/testutil.h:
    8 bytes magic "EXCBFIX1", uint32 n_tensors, then per tensor:
    uint32 name_len, name (ASCII), uint32 ndim, uint32 dims[ndim], float32 data (C order).
Rows of images and scores are view-major (row = v*B + i).
"""
import math
import struct
import sys

import torch
import torch.nn.functional as F

# the official constants (paper_notes.md §9, ResNet / SGD branch)
TAU_S, TAU_T, M_S, BOOST = 0.1, 0.04, 0.999, 0.01
LR_PEAK, LR_MIN_FACTOR, WD, CENTROID_BOOST, MOMENTUM, EMA_START = 0.6, 1e-4, 1e-4, 9.0, 0.9, 0.996
BN_EPS, NORM_EPS = 1e-5, 1e-12

CONFIGS = {
    # name: block, stem, in_ch, widths, blocks, hidden, d, K, G, L, Vg, Vl, B, step, T, W
    "tiny": dict(block="basic", stem="cifar", in_ch=1, widths=[4, 8, 8], blocks=[1, 1, 1], hidden=16,
                 d=8, K=16, G=8, L=4, Vg=2, Vl=6, B=4, step=36, T=100, W=10),
    "tiny50": dict(block="bottleneck", stem="imagenet", in_ch=3, widths=[2, 4], blocks=[1, 2],
                   hidden=16, d=8, K=16, G=16, L=8, Vg=2, Vl=6, B=4, step=3, T=100, W=10),
}


def layout(cfg):
    """[(name, shape)] in PyTorch registration order, and the backbone plan."""
    P, plan = [], []
    exp = 4 if cfg["block"] == "bottleneck" else 1
    k0, s0, p0 = (7, 2, 3) if cfg["stem"] == "imagenet" else (3, 1, 1)
    c0 = cfg["widths"][0]
    P += [("backbone.conv1.weight", (c0, cfg["in_ch"], k0, k0)), ("backbone.bn1.weight", (c0,)),
          ("backbone.bn1.bias", (c0,))]
    cin = c0
    for st, (w, nb) in enumerate(zip(cfg["widths"], cfg["blocks"])):
        for j in range(nb):
            pre = f"backbone.layer{st + 1}.{j}"
            stride = 2 if (st > 0 and j == 0) else 1
            if cfg["block"] == "basic":
                convs = [(cin, w, 3, stride, 1), (w, w, 3, 1, 1)]
            else:
                convs = [(cin, w, 1, 1, 0), (w, w, 3, stride, 1), (w, w * exp, 1, 1, 0)]
            units = []
            for u, (ci, co, k, s, p) in enumerate(convs):
                P += [(f"{pre}.conv{u + 1}.weight", (co, ci, k, k)), (f"{pre}.bn{u + 1}.weight", (co,)),
                      (f"{pre}.bn{u + 1}.bias", (co,))]
                units.append((f"{pre}.conv{u + 1}", f"{pre}.bn{u + 1}", s, p))
            cout = w * exp
            down = None
            if stride != 1 or cin != cout:
                P += [(f"{pre}.downsample.0.weight", (cout, cin, 1, 1)), (f"{pre}.downsample.1.weight", (cout,)),
                      (f"{pre}.downsample.1.bias", (cout,))]
                down = (f"{pre}.downsample.0", f"{pre}.downsample.1", stride, 0)
            plan.append((units, down))
            cin = cout
    D, Hd, d, K = cin, cfg["hidden"], cfg["d"], cfg["K"]
    pj = "classifier.projector.mlp"
    P += [(f"{pj}.0.weight", (Hd, D)), (f"{pj}.0.bias", (Hd,)), (f"{pj}.1.weight", (Hd,)), (f"{pj}.1.bias", (Hd,)),
          (f"{pj}.3.weight", (Hd, Hd)), (f"{pj}.3.bias", (Hd,)), (f"{pj}.4.weight", (Hd,)), (f"{pj}.4.bias", (Hd,)),
          (f"{pj}.6.weight", (d, Hd)), (f"{pj}.6.bias", (d,))]
    pd = "classifier.predictor.mlp"
    P += [(f"{pd}.0.weight", (Hd, d)), (f"{pd}.0.bias", (Hd,)), (f"{pd}.1.weight", (Hd,)), (f"{pd}.1.bias", (Hd,)),
          (f"{pd}.3.weight", (d, Hd)), (f"{pd}.3.bias", (d,))]
    P += [("classifier.centroid_layer.weight_v", (K, d)), ("classifier.predictor_activation.weight", (d,)),
          ("classifier.predictor_activation.bias", (d,))]
    return P, plan, (k0, s0, p0)


def bn(x, prm, name):
    """BatchNorm in train mode (batch statistics), as both student and teacher run it (A13)."""
    return F.batch_norm(x, None, None, prm[name + ".weight"], prm[name + ".bias"], True, 0.0, BN_EPS)


def backbone(prm, plan, stem, x, cfg):
    k0, s0, p0 = stem
    y = F.relu(bn(F.conv2d(x, prm["backbone.conv1.weight"], stride=s0, padding=p0), prm, "backbone.bn1"))
    if cfg["stem"] == "imagenet":
        y = F.max_pool2d(y, 3, 2, 1)
    for units, down in plan:
        idn = y if down is None else bn(F.conv2d(y, prm[down[0] + ".weight"], stride=down[2]), prm, down[1])
        h = y
        for u, (conv, bname, s, p) in enumerate(units):
            h = bn(F.conv2d(h, prm[conv + ".weight"], stride=s, padding=p), prm, bname)
            if u < len(units) - 1:
                h = F.relu(h)
        y = F.relu(h + idn)
    return y.mean(dim=(2, 3))                                   # global average pool -> (N, D)


def projector(prm, f):                                          # E0
    pj = "classifier.projector.mlp"
    a = F.relu(bn(F.linear(f, prm[f"{pj}.0.weight"], prm[f"{pj}.0.bias"]), prm, f"{pj}.1"))
    a = F.relu(bn(F.linear(a, prm[f"{pj}.3.weight"], prm[f"{pj}.3.bias"]), prm, f"{pj}.4"))
    return F.linear(a, prm[f"{pj}.6.weight"], prm[f"{pj}.6.bias"])


def predictor(prm, h):                                          # E10a
    pd = "classifier.predictor.mlp"
    x = bn(h, prm, "classifier.predictor_activation")
    a = F.relu(bn(F.linear(x, prm[f"{pd}.0.weight"], prm[f"{pd}.0.bias"]), prm, f"{pd}.1"))
    return F.linear(a, prm[f"{pd}.3.weight"], prm[f"{pd}.3.bias"])


def cosine(x, c):                                               # E1: <x/max(|x|,eps), c_k>
    return F.normalize(x, dim=1, eps=NORM_EPS) @ c.t()


def unit_centroids(v):                                          # weight norm with g = 1
    return v / v.norm(dim=1, keepdim=True)


def targets(zt, s, K):                                          # E3', E4, E5, E6
    r = s / s.sum() * K
    lower = torch.clamp(r, max=1.0)
    higher = torch.clamp(1.0 / r, max=1.0)
    z2 = ((1 - (1 - zt) * lower) + 1) * higher - 1
    a = z2.argmax(dim=1)
    boost = torch.ones_like(z2)
    boost[torch.arange(len(a)), a] = 1 + BOOST
    zh = torch.clamp(z2 * boost, -1, 1)
    return F.softmax(zh / TAU_T, dim=1)


def step(cfg, prm, tea, mom, s, xg, xl, plan, stem):
    B, Vg, Vl, K = cfg["B"], cfg["Vg"], cfg["Vl"], cfg["K"]
    out = {}
    with torch.no_grad():                                       # teacher: global crops only
        ht = projector(tea, backbone(tea, plan, stem, xg, cfg))
        zt = cosine(ht, unit_centroids(tea["classifier.centroid_layer.weight_v"]))
        q = targets(zt, s, K)
    out["teacher_sim"], out["teacher_q"] = zt, q
    labels = q.argmax(dim=1)
    out["labels"] = labels.float()
    out["s_before"] = s
    f = torch.cat([backbone(prm, plan, stem, xg, cfg), backbone(prm, plan, stem, xl, cfg)])   # A20
    h = projector(prm, f)
    c = unit_centroids(prm["classifier.centroid_layer.weight_v"])
    zd = cosine(h[:Vg * B], c)                                  # centroids get gradient (rows 0, 1)
    p = predictor(prm, h)
    zp = cosine(p, c.detach())                                  # A9: detached centroids
    for name, t in (("student_feat", f), ("student_proj", h), ("student_pred", p)):
        out[name] = t
    out["logits_direct"], out["logits_pred"] = zd / TAU_S, zp / TAU_S
    # E8, term by term: teacher view v <-> direct of every other global view, predictor of all crops
    terms = []
    for v in range(Vg):
        qv = q[v * B:(v + 1) * B]
        for u in range(Vg):
            if u != v:
                terms.append(-(qv * F.log_softmax(zd[u * B:(u + 1) * B] / TAU_S, 1)).sum(1).mean())
        for u in range(Vg + Vl):
            terms.append(-(qv * F.log_softmax(zp[u * B:(u + 1) * B] / TAU_S, 1)).sum(1).mean())
    assert len(terms) == Vg * (Vg - 1) + Vg * (Vg + Vl)
    loss = sum(terms) / len(terms)
    out["loss"] = loss.detach().reshape(1)
    # E2, E3 (after the loss): hard counts, the update term rounded through float16 (A4); in
    # float32 as the official code keeps s, so the C result must match it bit for bit
    counts = torch.bincount(labels, minlength=K).float()
    frac = counts / (Vg * B)
    term = (frac.half().float() * torch.tensor(1 - M_S).half().float()).half().float()
    out["s_after"] = s.float() * M_S + term
    loss.backward()
    grads = {n: t.grad.detach().clone() for n, t in prm.items()}
    t1 = cfg["step"] + 1                                        # scheduler step, 1-based
    T, W = cfg["T"], cfg["W"]
    lr = LR_PEAK * t1 / W if t1 < W else (LR_PEAK * LR_MIN_FACTOR + 0.5 * (LR_PEAK - LR_PEAK * LR_MIN_FACTOR)
                                          * (1 + math.cos(math.pi * (t1 - W) / (T - W))))
    wdc = WD * (1 + CENTROID_BOOST * 0.5 * (1 + math.cos(math.pi * t1 / T)))
    m = 1 - (1 - EMA_START) * 0.5 * (1 + math.cos(math.pi * cfg["step"] / T))
    new_p, new_m, new_t = {}, {}, {}
    with torch.no_grad():
        for n, t in prm.items():                                # E14: coupled wd, momentum
            wd = wdc if "centroid_layer" in n else (0.0 if t.dim() == 1 else WD)
            g = grads[n] + wd * t
            new_m[n] = MOMENTUM * mom[n] + g
            new_p[n] = t - lr * new_m[n]
            new_t[n] = tea[n] * m + new_p[n] * (1 - m)          # E9
    out["hyper"] = torch.tensor([lr, wdc, m])
    return out, grads, new_p, new_m, new_t


def draw_parameters(P):
    """A well-conditioned random state in float32, drawn in P's order from torch's current seed: the
    student (biases 0.1 N(0,1), so that no gradient is trivially zero; BN gammas around 1; Kaiming-like
    convolutions; Linear weights N(0, 1/in)), a teacher that differs from it, and a small momentum."""
    prm, tea, mom = {}, {}, {}
    for n, shape in P:
        if n.endswith(".bias"):
            t = 0.1 * torch.randn(shape)
        elif len(shape) == 1:
            t = 1 + 0.2 * torch.randn(shape)
        elif len(shape) == 4:
            t = torch.randn(shape) * math.sqrt(2.0 / (shape[0] * shape[2] * shape[3]))
        else:
            t = torch.randn(shape) / math.sqrt(shape[1])
        prm[n] = t.clone()
        tea[n] = t + 0.1 * t.std() * torch.randn(shape)
        mom[n] = 0.01 * torch.randn(shape)
    return prm, tea, mom


def make(name, seed):
    cfg = CONFIGS[name]
    torch.manual_seed(seed)
    P, plan, stem = layout(cfg)
    prm, tea, mom = draw_parameters(P)
    prm = {n: t.requires_grad_(True) for n, t in prm.items()}
    B, Vg, Vl, C = cfg["B"], cfg["Vg"], cfg["Vl"], cfg["in_ch"]
    xg = torch.randn(Vg * B, C, cfg["G"], cfg["G"])
    xl = torch.randn(Vl * B, C, cfg["L"], cfg["L"])
    e = -torch.log(torch.rand(cfg["K"]))
    s = e / e.sum()                                             # a non-uniform size estimate
    # The state is drawn in float32 (what the C code holds); the step runs in float64, so the
    # fixture holds the exact answer (to float64) and the C test measures only excb.c's own error.
    f64 = lambda d: {n: t.detach().double().requires_grad_(t.requires_grad) for n, t in d.items()}
    prm, tea, mom = f64(prm), f64(tea), f64(mom)
    out, grads, new_p, new_m, new_t = step(cfg, prm, tea, mom, s.double(), xg.double(), xl.double(),
                                           plan, stem)
    T = [("meta", torch.tensor([cfg["step"], cfg["T"], cfg["W"], cfg["K"], cfg["B"]], dtype=torch.float32)),
         ("x_global", xg), ("x_local", xl)]
    T += [("param." + n, prm[n].detach()) for n, _ in P]
    T += [("teacher." + n, tea[n]) for n, _ in P]
    T += [("momentum." + n, mom[n]) for n, _ in P]
    T += [(k, v.detach()) for k, v in out.items()]
    T += [("grad." + n, grads[n]) for n, _ in P]
    T += [("momentum_after." + n, new_m[n]) for n, _ in P]
    T += [("param_after." + n, new_p[n]) for n, _ in P]
    T += [("teacher_after." + n, new_t[n]) for n, _ in P]
    path = f"tests/reference/{name}.bin"
    with open(path, "wb") as fh:
        fh.write(b"EXCBFIX1" + struct.pack("<I", len(T)))
        for n, t in T:
            t = t.detach().to(torch.float32).contiguous()
            nb = n.encode("ascii")
            fh.write(struct.pack("<I", len(nb)) + nb + struct.pack("<I", t.dim()))
            fh.write(struct.pack(f"<{t.dim()}I", *t.shape))
            fh.write(t.numpy().astype("<f4").tobytes())
    print(f"{path}: {len(T)} tensors, loss {float(out['loss']):.7f}")


def main():
    torch.set_num_threads(1)
    if "--yardstick" in sys.argv:
        float32_yardstick("tiny", 1)
        float32_yardstick("tiny50", 2)
        return
    make("tiny", 1)
    make("tiny50", 2)


def float32_yardstick(name, seed):
    """How far PyTorch's own float32 step is from the float64 one, with the C test's metric: the
    yardstick for the C test's tolerances (python3 make_fixture.py --yardstick)."""
    cfg = CONFIGS[name]
    res = {}
    for dt in (torch.float64, torch.float32):
        torch.manual_seed(seed)
        P, plan, stem = layout(cfg)
        prm, tea, mom = draw_parameters(P)                  # the same draws as make()
        prm = {n: t.to(dt).requires_grad_(True) for n, t in prm.items()}
        tea = {n: t.to(dt) for n, t in tea.items()}
        mom = {n: t.to(dt) for n, t in mom.items()}
        B, Vg, Vl, C = cfg["B"], cfg["Vg"], cfg["Vl"], cfg["in_ch"]
        xg = torch.randn(Vg * B, C, cfg["G"], cfg["G"]).to(dt)
        xl = torch.randn(Vl * B, C, cfg["L"], cfg["L"]).to(dt)
        e = -torch.log(torch.rand(cfg["K"]))
        res[dt] = step(cfg, prm, tea, mom, (e / e.sum()).to(dt), xg, xl, plan, stem)
    def rel(a, b):
        return float((a.double() - b.double()).abs().max() / max(b.double().abs().max(), 1e-300))
    (o64, g64, p64, m64, t64), (o32, g32, p32, m32, t32) = res[torch.float64], res[torch.float32]
    gmax = max(float(g.abs().max()) for g in g64.values())
    def grad_err(n):
        r = float(g64[n].abs().max())
        e = rel(g32[n], g64[n])
        return e * r / (1e-3 * gmax) if r < 1e-3 * gmax else e
    print(f"{name}: PyTorch float32 vs float64 (the C test's metric):")
    print(f"  teacher similarity {rel(o32['teacher_sim'], o64['teacher_sim']):.3g}")
    print(f"  teacher targets q  {rel(o32['teacher_q'], o64['teacher_q']):.3g}")
    print(f"  student activations {max(rel(o32[k], o64[k]) for k in ('student_feat', 'student_proj', 'student_pred', 'logits_direct', 'logits_pred')):.3g}")
    print(f"  loss {rel(o32['loss'], o64['loss']):.3g}")
    worst = max(g64, key=grad_err)
    print(f"  gradients {grad_err(worst):.3g} (in {worst})")
    print(f"  momentum after {max(rel(m32[n], m64[n]) for n in m64):.3g}")
    print(f"  parameters after {max(rel(p32[n], p64[n]) for n in p64):.3g}")
    print(f"  teacher after {max(rel(t32[n], t64[n]) for n in t64):.3g}")


if __name__ == "__main__":
    main()
