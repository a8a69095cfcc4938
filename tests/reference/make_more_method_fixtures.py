#!/usr/bin/python3
"""Write the parity fixtures of three more methods, tests/reference/methods/{coke,carp,mvbt}_*.bin
(format "EXCBFIX2", as make_method_fixtures.py writes them) and methods/YARDSTICK_MORE.txt.

An independent float64 PyTorch reference of ONE training step for
  * coke: CoKe (arXiv 2105.11527; idstcv/CoKe, first stage): online constrained k-means with dual
    variables, per-instance labels, previous-epoch centres as the classifier, projection and
    predictor branches;
  * carp: CARP (arXiv 2310.12692; sthalles/carp): learned prototypes without input normalisation,
    a random partition of the prototypes per step, per-block consistency and uniformity terms;
  * mvbt: the multi-view Barlow Twins of arXiv 2312.10725 (kumarkrishna/fastssl barlow_twins.py),
written from the descriptions of these methods in paper_notes.md section 5c (the official code's
equations and how this harness runs them) as deltas to make_method_fixtures.run_step. The network (layout, backbone,
projector, predictor, BN in train mode, unit centroids), the parameter draws, the counter-based hash,
the ReLU-margin conditioning, SGD with coupled weight decay, the schedules, the teacher EMA and the
file format are those of make_method_fixtures.py / make_fixture.py, imported from them.

New relative to make_method_fixtures.py: the number of global views Vg is a setting (n_global).

Every result is stored twice: the float64 truth under its own name and, as "f32.NAME", the same code
run in float32 from the same float32 inputs and state.

    /usr/bin/python3 tests/reference/make_more_method_fixtures.py              # writes the fixtures
    /usr/bin/python3 tests/reference/make_more_method_fixtures.py --selfcheck  # finite differences etc.
"""
import math
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_fixture import layout, backbone, bn, projector, predictor, unit_centroids, draw_parameters  # noqa: E402
from make_method_fixtures import (NORM_EPS, VN, RELU_MARGIN, Q_MARGIN, _relu_margin, hash5, sgd_and_ema, step_results,  # noqa: E402
                                  DEFAULTS, SHAPES, config_text, write_fixture, DT_CODE, GROUPS)

# ---------------------------------------------------------------- configurations
NEW_DEFAULTS = dict(n_global=2, carp_block=512, coke_k=[3000, 4000, 5000], coke_tau=0.05, coke_beta=0.5,
                    coke_gamma=0.4, coke_eta=20.0, mvbt_lambda_d=1.0)
METHOD_KEYS = {"carp": ["carp_block"],
               "coke": ["coke_k", "coke_tau", "coke_beta", "coke_gamma", "coke_eta"],
               "mvbt": ["mvbt_lambda_d"]}
PAIRING = {"carp": "swapped", "coke": "auto", "mvbt": "auto"}   # carp: the spec's; coke, mvbt: unused
CARP_EPS = 2.0 ** -23                  # float32's machine epsilon, in both runs
CARP_CLAMP_REL = 1e-3                  # no clamp of the carp loss within this (relative) of firing
DUAL_MARGIN = 1e-5                     # a CoKe dual's pre-clamp value must be this far (relative) from 0

# name, shape, method, seed, overrides, extras (N: CoKe's data-set size)
FIXTURES = [
    ("carp_tiny", "A", "carp", 51, dict(carp_block=4), {}),
    ("carp_odd", "B", "carp", 52, dict(carp_block=3), {}),
    ("carp_nolocal", "C", "carp", 53, dict(carp_block=5), {}),
    ("carp_vg3", "A", "carp", 54, dict(n_global=3, Vl=2, carp_block=8), {}),
    ("coke_tiny", "A", "coke", 61, dict(coke_k=[16, 12], step=6), {"N": 64}),
    ("coke_boundary", "B", "coke", 62, dict(coke_k=[12], step=10, coke_beta=0.3, coke_gamma=0.7,
                                            coke_eta=2.0), {"N": 50}),
    ("coke_later", "C", "coke", 63, dict(coke_k=[20, 8, 5], step=47, coke_beta=0.75, coke_eta=1.0),
     {"N": 120}),
    ("coke_single", "C", "coke", 64, dict(n_global=1, Vl=0, coke_k=[12, 7], step=33, coke_tau=0.1,
                                          coke_beta=0.6, coke_gamma=0.25, coke_eta=0.5), {"N": 200}),
    ("mvbt_tiny", "A", "mvbt", 71, {}, {}),
    ("mvbt_two", "C", "mvbt", 72, dict(mvbt_lambda_d=0.5), {}),
    ("mvbt_vg3", "B", "mvbt", 73, dict(n_global=3), {}),
]


def build_cfg(shape, method, seed, overrides):
    cfg = dict(SHAPES[shape])
    cfg.update(DEFAULTS)
    cfg.update(NEW_DEFAULTS)
    cfg.update(overrides)
    cfg.update(method=method, pairing=PAIRING[method], seed=seed)
    if method == "carp":
        assert cfg["K"] % cfg["carp_block"] == 0, "K must be a multiple of carp_block"
    if method == "coke":
        assert 0 < cfg["coke_gamma"] < 1
    if method == "mvbt":
        assert cfg["n_global"] + cfg["Vl"] >= 2
    return cfg


def more_config_text(cfg):
    """The existing keys (make_method_fixtures.CONFIG_KEYS, their values), then n_global and the method's."""
    lines = [f"n_global = {cfg['n_global']!r}"]
    for k in METHOD_KEYS[cfg["method"]]:
        v = cfg[k]
        v = ",".join(repr(int(x)) for x in v) if isinstance(v, list) else repr(v)
        lines.append(f"{k} = {v}")
    return config_text(cfg) + "\n".join(lines) + "\n"


def method_layout(cfg):
    P, plan, stem = layout(cfg)
    if cfg["method"] in ("coke", "mvbt"):                       # no learned prototype tensor
        P = [(n, s) for n, s in P if n != VN]
    return P, plan, stem


# ---------------------------------------------------------------- random state
def draw_state(cfg, extras, P):
    """make_method_fixtures.draw_state's order: seed, parameters, global crops (Vg*B), local crops, state."""
    torch.manual_seed(cfg["seed"])
    prm, tea, mom = draw_parameters(P)
    B, Vg, Vl, C = cfg["B"], cfg["n_global"], cfg["Vl"], cfg["in_ch"]
    xg = torch.randn(Vg * B, C, cfg["G"], cfg["G"])
    xl = torch.randn(Vl * B, C, cfg["L"], cfg["L"])
    st = dict(param=prm, teacher=tea, momentum=mom, xg=xg, xl=xl, state={}, extra={})
    if cfg["method"] == "coke":
        ks, d, N = cfg["coke_k"], cfg["d"], extras["N"]
        KS = sum(ks)
        cprev = F.normalize(torch.randn(KS, d), dim=1, eps=NORM_EPS)
        ccur = F.normalize(torch.randn(KS, d), dim=1, eps=NORM_EPS)
        duals = 0.4 * torch.rand(KS)
        kind = torch.rand(KS)
        duals[kind < 0.3] = 0.0                                 # exactly zero
        small = (kind >= 0.3) & (kind < 0.5)
        duals[small] = 1e-3 * (0.1 + torch.rand(int(small.sum())))   # small positive
        duals[0] = 0.0
        counters = torch.randint(0, 6, (KS,)).float()
        counters[1] = 0.0
        labels = torch.stack([torch.randint(0, K, (N,)) for K in ks]).double()
        bidx = torch.randperm(N)[:B].double()
        st["state"] = dict(centers_prev=cprev, centers_cur=ccur, duals=duals, counters=counters,
                           labels=labels)
        st["extra"]["batch_index"] = bidx
        st["N"] = N
    elif cfg["method"] == "carp":
        st["extra"]["partition"] = torch.tensor(carp_partition(cfg["seed"], cfg["step"], cfg["K"]),
                                                dtype=torch.float64)
    return st


def carp_partition(seed, step, K):
    perm = list(range(K))
    for i in range(K - 1, 0, -1):
        j = hash5(seed, 11, step, i, 0) % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


# ---------------------------------------------------------------- the methods' losses
def carp_loss(zs, zt, perm, NB, B, Vg, NV, info=None):
    K = zs.shape[1]
    idx = torch.tensor(perm, dtype=torch.long).view(K // NB, NB)
    ps = F.softmax(zs[:, idx], dim=-1)                          # (NS, nblocks, NB)
    qt = F.softmax(zt[:, idx], dim=-1).detach()                 # (NG, nblocks, NB)
    terms, svals = [], []
    for v in range(Vg):
        qv = qt[v * B:(v + 1) * B]
        for u in range(NV):
            if u != v:
                s = (ps[u * B:(u + 1) * B] * qv).sum(-1)        # (B, nblocks)
                svals.append(s.detach().flatten())
                terms.append(-torch.log(torch.clamp(s, CARP_EPS, 1 - CARP_EPS)).mean())
    assert len(terms) == Vg * NV - Vg
    Lc = sum(terms) / len(terms)
    pbar = torch.cat([ps, qt]).mean(dim=0)                      # (nblocks, NB), all (NV + Vg) * B rows
    Lh = (math.log(NB) + (pbar * torch.log(torch.clamp(pbar, CARP_EPS, 1 - CARP_EPS))).sum(-1)).mean()
    if info is not None:
        allv = torch.cat(svals + [pbar.detach().flatten()]).double()
        lo, hi = CARP_EPS, 1 - CARP_EPS
        info["_clamp_fired"] = int(((allv < lo) | (allv > hi)).sum())
        info["_clamp_near"] = int((((allv - lo).abs() < CARP_CLAMP_REL * lo) |
                                   ((allv - hi).abs() < CARP_CLAMP_REL * hi)).sum())
        info["_s_range"] = (float(torch.cat(svals).min()), float(torch.cat(svals).max()))
        info["_Lc_Lh"] = (float(Lc), float(Lh))
    return Lc + Lh


def mvbt_loss_from_views(views, lam):
    """The loss of the standardised views zn_a (each (B, d))."""
    A, B = len(views), views[0].shape[0]
    d = views[0].shape[1]
    off = ~torch.eye(d, dtype=torch.bool)
    if A == 2:
        c = views[0].t() @ views[1] / B
        return ((torch.diagonal(c) - 1) ** 2).sum() + lam * (c[off] ** 2).sum()
    assert A > 2
    zbar = sum(views[1:], views[0]) / A
    on = torch.stack([(za * zbar).mean(dim=0) for za in views])  # (A, d)
    cc = zbar.t() @ zbar / B
    return ((on - 1) ** 2).sum() / A + lam * (cc[off] ** 2).sum()


def mvbt_loss(z, A, B, lam):
    zn = (z - z.mean(dim=0)) / z.std(dim=0)                     # unbiased std over all NS rows
    return mvbt_loss_from_views([zn[a * B:(a + 1) * B] for a in range(A)], lam)


def coke_assign(cfg, x, state, bidx, info):
    """CoKe's state update on detached x (B, d): returns the targets (H, B) long and the new state."""
    B = x.shape[0]
    step, spe = cfg["step"], cfg["spe"]
    epoch = step // spe
    eta, gamma = cfg["coke_eta"], cfg["coke_gamma"]
    cp, cc = state["centers_prev"].clone(), state["centers_cur"].clone()
    du, cn, lab = state["duals"].clone(), state["counters"].clone(), state["labels"].clone()
    if step > 0 and step % spe == 0:                            # first step of an epoch
        cp = cc.clone()
        cn = torch.zeros_like(cn)
        info["_boundary"] = True
    gaps, dmarg, fired, targets = [], [], 0, []
    off = 0
    for j, K in enumerate(cfg["coke_k"]):
        sl = slice(off, off + K)
        sc = x @ cc[sl].t() + du[sl]
        y = sc.argmax(dim=1)                                    # first index wins a tie
        assert K >= 2
        top2 = sc.topk(2, dim=1).values
        gaps.append(float(((top2[:, 0] - top2[:, 1]) / sc.abs().max(dim=1).values.clamp_min(1e-300)).min()))
        t = y.clone() if epoch == 0 else lab[j, bidx].long()
        targets.append(t)
        lab[j, bidx] = y.to(lab.dtype)
        n = torch.bincount(y, minlength=K).to(x.dtype)
        d0 = du[sl]
        dn = torch.where(n > 0, d0 - eta * n / B, d0)
        dn = dn + eta * gamma / K
        scale = d0.abs() + eta * n / B + eta * gamma / K
        dmarg.append(float((dn.abs() / scale).min()))
        fired += int((dn < 0).sum())
        du[sl] = torch.clamp(dn, min=0.0)
        for k in range(K):
            nk = n[k]
            if float(nk) > 0:
                r = off + k
                alpha = cn[r] / (cn[r] + nk)
                cn[r] = cn[r] + nk
                v = cc[r] * alpha + x[y == k].sum(dim=0) / cn[r]
                cc[r] = v / v.norm()
        off += K
    info["_argmax_gap"] = min(gaps)
    info["_dual_margin"] = min(dmarg)
    info["_duals_clamped"] = fired
    info["_epoch"] = epoch
    return torch.stack(targets), dict(centers_prev=cp, centers_cur=cc, duals=du, counters=cn, labels=lab)


# ---------------------------------------------------------------- one step, in dtype dt
def xg_rows(st):
    return st["xg"].shape[0]


def forward(cfg, dt, plan, stem, st, prm, tea, state, info):
    """The loss and the outputs of one step from the parameters prm (dt tensors)."""
    B, Vg, Vl = cfg["B"], cfg["n_global"], cfg["Vl"]
    NV = Vg + Vl
    assert xg_rows(st) == Vg * B and st["xl"].shape[0] == Vl * B   # view-major: NG = Vg*B, NS = NV*B rows
    method = cfg["method"]
    xg, xl = st["xg"].to(dt), st["xl"].to(dt)
    out, state_after = {}, {}
    if method == "carp":                                        # teacher: global crops only
        with torch.no_grad():
            ht = projector(tea, backbone(tea, plan, stem, xg, cfg))
            zt = ht @ unit_centroids(tea[VN]).t()
        out["teacher_sim"] = zt
    fg = backbone(prm, plan, stem, xg, cfg)
    f = torch.cat([fg, backbone(prm, plan, stem, xl, cfg)]) if Vl > 0 else fg
    h = projector(prm, f)
    out["student_feat"], out["student_proj"] = f, h
    if method == "carp":
        zs = h @ unit_centroids(prm[VN]).t()
        out["logits_direct"] = zs
        perm = [int(x) for x in st["extra"]["partition"].tolist()]
        loss = carp_loss(zs, zt, perm, cfg["carp_block"], B, Vg, NV, info)
    elif method == "mvbt":
        loss = mvbt_loss(h, NV, B, cfg["mvbt_lambda_d"] / cfg["d"])
    elif method == "coke":
        p = predictor(prm, h)
        out["student_pred"] = p
        # CoKe's projector ends with a BatchNorm (builder_*_view.py): the harness's is the predictor's
        # input BatchNorm, classifier.predictor_activation, which the predictor reads as well
        u = F.normalize(bn(h, prm, "classifier.predictor_activation"), dim=1, eps=NORM_EPS)
        up = F.normalize(p, dim=1, eps=NORM_EPS)
        with torch.no_grad():
            ud = u.detach()
            s = ud[0:B]
            for v in range(1, Vg):
                s = s + ud[v * B:(v + 1) * B]
            x = (1.0 / Vg) * s
            bidx = st["extra"]["batch_index"].long()
            tg, state_after = coke_assign(cfg, x, state, bidx, info)
        out["targets"] = tg.to(dt)
        tau, beta = cfg["coke_tau"], cfg["coke_beta"]
        loss, off = 0.0, 0
        for j, K in enumerate(cfg["coke_k"]):
            C = state_after["centers_prev"][off:off + K].detach()
            off += K
            lp = sum(F.cross_entropy(up[a * B:(a + 1) * B] @ C.t() / tau, tg[j]) for a in range(NV)) / NV
            ld = sum(F.cross_entropy(u[a * B:(a + 1) * B] @ C.t() / tau, tg[j]) for a in range(NV)) / NV
            loss = loss + beta * lp + (1 - beta) * ld
        loss = loss / len(cfg["coke_k"])
    else:
        raise ValueError(method)
    return loss, out, state_after


def cast_params(st, P, dt):
    prm = {n: st["param"][n].to(dt) for n, _ in P}
    tea = {n: st["teacher"][n].to(dt) for n, _ in P}
    mom = {n: st["momentum"][n].to(dt) for n, _ in P}
    state = {k: v.to(dt) for k, v in st["state"].items()}
    return prm, tea, mom, state


def run_step(cfg, dt, P, plan, stem, st):
    prm, tea, mom, state = cast_params(st, P, dt)
    for n in prm:
        prm[n].requires_grad_(True)
    info = {}
    loss, out, state_after = forward(cfg, dt, plan, stem, st, prm, tea, state, info)
    out["loss"] = loss.detach().reshape(1)
    names = [n for n, _ in P]
    gl = torch.autograd.grad(loss, [prm[n] for n in names], allow_unused=True)
    grads = {n: (torch.zeros_like(prm[n]) if g is None else g.detach()) for n, g in zip(names, gl)}
    if cfg["method"] in ("carp", "mvbt"):                       # no predictor branch
        for n in names:
            if n.startswith("classifier.predictor"):
                assert float(grads[n].abs().max()) == 0.0, n

    # ---- SGD (coupled wd, centroid wd schedule), teacher EMA: make_method_fixtures.run_step's
    (lr, wdc, em), new_p, new_m, new_t = sgd_and_ema(cfg, names, prm, tea, mom, grads)
    info["_hyper"] = (lr, wdc, em)
    return step_results(out, state_after, names, grads, new_m, new_p, new_t), info


# ---------------------------------------------------------------- writing
MORE_GROUPS = GROUPS[:3] + [("targets", lambda k: k == "targets")] + GROUPS[3:]


def conditioned(cfg, info):
    """Why this float64 step is ill-conditioned for a float32 comparison ('' when it is not)."""
    why = []
    if _relu_margin[0] < RELU_MARGIN:
        why.append(f"a ReLU input at {_relu_margin[0]:.2g} of its scale")
    if cfg["method"] == "coke":
        if info["_argmax_gap"] < Q_MARGIN:
            why.append(f"an assignment's top-2 gap {info['_argmax_gap']:.2g}")
        if info["_dual_margin"] < DUAL_MARGIN:
            why.append(f"a dual's pre-clamp value at {info['_dual_margin']:.2g} of its scale")
    if cfg["method"] == "carp" and (info["_clamp_near"] or info["_clamp_fired"]):
        why.append(f"carp clamp near firing {info['_clamp_near']}, fired {info['_clamp_fired']}")
    return ", ".join(why)


def prepare(name, shape, method, seed0, overrides, extras):
    """A well-conditioned state: redrawn (seed + 1000 * attempt) until conditioned() says nothing."""
    for attempt in range(50):
        seed = seed0 + 1000 * attempt
        cfg = build_cfg(shape, method, seed, overrides)
        P, plan, stem = method_layout(cfg)
        st = draw_state(cfg, extras, P)
        _relu_margin[0] = math.inf
        r64, info = run_step(cfg, torch.float64, P, plan, stem, st)
        why = conditioned(cfg, info)
        if not why:
            return cfg, P, plan, stem, st, r64, info
        print(f"{name}: seed {seed}: {why}: drawn again")
    raise SystemExit(f"{name}: no well-conditioned state in 50 draws")


def make(name, shape, method, seed0, overrides, extras, outdir, yard):
    cfg, P, plan, stem, st, r64, info = prepare(name, shape, method, seed0, overrides, extras)
    r32, info32 = run_step(cfg, torch.float32, P, plan, stem, st)
    meta = [cfg["step"], cfg["T"], cfg["W"], cfg["spe"], cfg["in_ch"]] + ([st["N"]] if method == "coke" else [])
    T = [("config", torch.tensor(list(more_config_text(cfg).encode("ascii")), dtype=torch.uint8)),
         ("meta", torch.tensor(meta, dtype=torch.float64)),
         ("x_global", st["xg"]), ("x_local", st["xl"])]
    T += [("param." + n, st["param"][n]) for n, _ in P]
    T += [("teacher." + n, st["teacher"][n]) for n, _ in P]
    T += [("momentum." + n, st["momentum"][n]) for n, _ in P]
    T += [("state." + k, v) for k, v in st["state"].items()]
    T += [(k, v) for k, v in st["extra"].items()]
    for k in r64:
        assert r64[k].dtype == torch.float64 and r32[k].dtype == torch.float32, k
        assert r64[k].shape == r32[k].shape, k
        T += [(k, r64[k]), ("f32." + k, r32[k])]
    for n, t in T:
        assert t.dtype in DT_CODE, n
        if not n.startswith("f32.") and n != "config" and t.dtype == torch.float64:
            assert bool(torch.isfinite(t).all()), n
    assert len({n for n, _ in T}) == len(T)
    path = os.path.join(outdir, name + ".bin")
    write_fixture(path, T)

    notes, nmis = [], 0
    NV = cfg["n_global"] + cfg["Vl"]
    if method == "coke":
        nmis = int((r64["targets"] != r32["targets"].double()).sum()) + \
            int((r64["state_after.labels"] != r32["state_after.labels"].double()).sum())
        if nmis:
            notes.append(f"LABELS DIFFER f32 vs f64 in {nmis} entries")
        changed = int((r64["state_after.labels"] != st["state"]["labels"]).sum())
        notes.append(f"epoch {info['_epoch']}{' (boundary: centres_prev replaced)' if info.get('_boundary') else ''}"
                     f", {changed} labels changed, {info['_duals_clamped']} duals clamped at 0, "
                     f"argmax gap {info['_argmax_gap']:.3g}, dual margin {info['_dual_margin']:.3g}")
        if info.get("_boundary") != info32.get("_boundary"):
            notes.append("BOUNDARY DIFFERS")
    if method == "carp":
        nb = cfg["K"] // cfg["carp_block"]
        notes.append(f"{nb} blocks of {cfg['carp_block']}, {cfg['n_global'] * NV - cfg['n_global']} pairs, "
                     f"p.q in [{info['_s_range'][0]:.3g}, {info['_s_range'][1]:.3g}], L_c {info['_Lc_Lh'][0]:.6g} "
                     f"L_h {info['_Lc_Lh'][1]:.6g}, clamps fired {info['_clamp_fired']} (f32 {info32['_clamp_fired']})")
    if method == "mvbt":
        notes.append(f"A = {NV} views, lambda = {cfg['mvbt_lambda_d']!r}/{cfg['d']}")
    lr, wdc, em = info["_hyper"]
    notes.append(f"lr {lr:.6g} wd_centroid {wdc:.6g} ema {em:.6g}")
    size = os.path.getsize(path)
    loss = float(r64["loss"])
    print(f"{path}: {len(T)} tensors, {size} bytes, seed {cfg['seed']}, loss {loss!r} "
          f"(f32 {float(r32['loss'])!r}); " + "; ".join(notes))
    yard.append(f"{name}  ({method}, pairing {cfg['pairing']}, n_global {cfg['n_global']}, seed {cfg['seed']}, "
                f"loss {loss!r}, label mismatches {nmis})")
    for gname, sel in MORE_GROUPS:
        ks = [k for k in r64 if sel(k)]
        if not ks:
            continue
        err = max(float((r32[k].double() - r64[k]).abs().max()) if r64[k].numel() else 0.0 for k in ks)
        mx = max(float(r64[k].abs().max()) if r64[k].numel() else 0.0 for k in ks)
        yard.append(f"  {gname:20s} max_abs_err {err:.3e}  max_abs_truth {mx:.3e}")
    return name, size, loss, [n for n, _ in T]


# ---------------------------------------------------------------- self-checks
FD_PARAMS = {
    "carp": [("backbone.conv1.weight", 3), ("backbone.layer1.0.bn1.weight", 1),
             ("classifier.projector.mlp.6.bias", 2), ("classifier.projector.mlp.6.weight", 5),
             ("classifier.projector.mlp.3.weight", 17), (VN, 7), (VN, 13)],
    "coke": [("backbone.conv1.weight", 3), ("backbone.layer1.0.bn2.bias", 0),
             ("classifier.projector.mlp.6.weight", 5), ("classifier.predictor.mlp.3.weight", 4),
             ("classifier.predictor.mlp.3.bias", 0), ("classifier.predictor_activation.weight", 1),
             ("classifier.predictor.mlp.0.weight", 9)],
    "mvbt": [("backbone.conv1.weight", 3), ("backbone.layer1.0.conv2.weight", 11),
             ("classifier.projector.mlp.4.weight", 3), ("classifier.projector.mlp.6.weight", 7),
             ("classifier.projector.mlp.3.weight", 17)],
}
# biases whose gradient is 0 in exact arithmetic (a BatchNorm or, in mvbt, the standardisation follows)
STRUCTURAL_ZERO = {
    "carp": ["classifier.projector.mlp.0.bias", "classifier.projector.mlp.3.bias"],
    "coke": ["classifier.projector.mlp.0.bias", "classifier.predictor.mlp.0.bias",
             "classifier.projector.mlp.6.bias"],   # the last one feeds CoKe's final BatchNorm
    "mvbt": ["classifier.projector.mlp.0.bias", "classifier.projector.mlp.6.bias"],
}


def selfcheck():
    fx = {f[0]: f for f in FIXTURES}
    worst = 0.0
    # (1) finite differences of the float64 loss
    for fname in ("carp_tiny", "carp_vg3", "coke_tiny", "coke_boundary", "coke_later", "coke_single",
                  "mvbt_tiny", "mvbt_two", "mvbt_vg3"):
        name, shape, method, seed0, overrides, extras = fx[fname]
        cfg, P, plan, stem, st, r64, info = prepare(name, shape, method, seed0, overrides, extras)
        dt = torch.float64

        def loss_at(n=None, i=None, delta=0.0):
            prm, tea, _, state = cast_params(st, P, dt)
            if n is not None:
                prm[n] = prm[n].clone()
                prm[n].view(-1)[i] += delta
            with torch.no_grad():
                return float(forward(cfg, dt, plan, stem, st, prm, tea, state, {})[0])
        l0 = loss_at()
        assert abs(l0 - float(r64["loss"])) <= 1e-12 * max(1.0, abs(l0)), (l0, float(r64["loss"]))
        hstep = 1e-6
        gscale = max(float(r64[k].abs().max()) for k in r64 if k.startswith("grad."))
        parts = []
        for n, i in FD_PARAMS[method]:
            g = float(r64["grad." + n].reshape(-1)[i])
            fd = (loss_at(n, i, hstep) - loss_at(n, i, -hstep)) / (2 * hstep)
            rel = abs(fd - g) / max(abs(fd), abs(g), 1e-300)
            rel_s = abs(fd - g) / max(abs(fd), abs(g), 1e-3 * gscale)
            worst = max(worst, rel_s)
            parts.append(f"{n}[{i}] grad {g:+.6e} fd {fd:+.6e} rel {rel:.1e} (floor 1e-3 max|grad|: {rel_s:.1e})")
        z = max(float(r64["grad." + n].abs().max()) for n in STRUCTURAL_ZERO[method])
        assert z < 1e-12 * gscale, z
        parts.append(f"structurally zero gradients ({', '.join(STRUCTURAL_ZERO[method])}): max |grad| {z:.1e} "
                     f"(max |grad| overall {gscale:.3e})")
        print(f"FD {fname} (seed {cfg['seed']}, loss {l0:.10g}):")
        for s in parts:
            print("    " + s)
    print(f"FD worst relative error (floor 1e-3 max|grad|) {worst:.2e}")
    assert worst < 1e-5, worst

    # (2) carp partition
    for fname in ("carp_tiny", "carp_odd", "carp_nolocal", "carp_vg3"):
        name, shape, method, seed0, overrides, extras = fx[fname]
        cfg = build_cfg(shape, method, seed0, overrides)
        K, NB = cfg["K"], cfg["carp_block"]
        perm = carp_partition(cfg["seed"], cfg["step"], K)
        again = carp_partition(cfg["seed"], cfg["step"], K)
        blocks = [perm[b * NB:(b + 1) * NB] for b in range(K // NB)]
        once = sorted(x for blk in blocks for x in blk) == list(range(K))
        other = carp_partition(cfg["seed"], cfg["step"] + 1, K)
        print(f"partition {fname}: K {K}, {len(blocks)} blocks of {NB}, every prototype exactly once: {once}, "
              f"same (seed, step) same partition: {perm == again}, next step differs: {perm != other}; "
              f"blocks {blocks}")
        assert once and perm == again
    # the hash itself, against the generator's published self-check values
    print(f"hash5(0, 5, 0, 0, 0) = 0x{hash5(0, 5, 0, 0, 0):016x}")

    # (3) mvbt: identical standardised views whose cross-correlation is the identity
    torch.manual_seed(5)
    for B, d in ((9, 8), (13, 6)):
        Q, _ = torch.linalg.qr(torch.randn(B, d, dtype=torch.float64))
        Z = Q * math.sqrt(B)                                    # Z.T Z / B = I
        for A in (2, 3, 5, 8):
            L = float(mvbt_loss_from_views([Z.clone() for _ in range(A)], 0.37))
            print(f"mvbt identity views: B {B} d {d} A {A}: loss {L:.3e}")
            assert abs(L) < 1e-24
        # through the standardisation: zero-mean identical views give zn = Z sqrt((NS-1)/NS), so the
        # diagonal is (NS-1)/NS and the loss d / NS^2 (the unbiased std's signature)
        Zc = Z - Z.mean(dim=0)
        Zc = Zc / Zc.norm(dim=0) * math.sqrt(B)
        Qc, _ = torch.linalg.qr(torch.cat([Zc, torch.ones(B, 1, dtype=torch.float64)], 1))
        for A in (2, 5):
            NS = A * B
            W = Qc[:, :d] * math.sqrt(B)                        # orthogonal to ones: zero mean, W.T W / B = I
            L = float(mvbt_loss(torch.cat([W] * A), A, B, 0.37))
            print(f"mvbt through standardisation: B {B} d {d} A {A}: loss {L:.12g}, d/NS^2 = {d / NS ** 2:.12g}")
            assert abs(L - d / NS ** 2) < 1e-12
        # a view pair that differs: the A == 2 branch by hand
        Y = torch.randn(B, d, dtype=torch.float64)
        c = Z.t() @ Y / B
        byhand = sum((c[k, k] - 1) ** 2 for k in range(d)) + 0.37 * sum(
            c[k, l] ** 2 for k in range(d) for l in range(d) if k != l)
        L = float(mvbt_loss_from_views([Z, Y], 0.37))
        print(f"mvbt A=2 by hand: {L:.12g} vs {float(byhand):.12g}")
        assert abs(L - float(byhand)) < 1e-10 * abs(L)
    print("selfcheck passed")


def main():
    torch.set_num_threads(1)
    if "--selfcheck" in sys.argv:
        selfcheck()
        return
    outdir = os.path.join(HERE, "methods")
    os.makedirs(outdir, exist_ok=True)
    yard = ["float32 PyTorch run vs float64 truth, per fixture and tensor group (coke, carp, mvbt):",
            "max abs error of f32.NAME against NAME, and max |NAME|, over the group's tensors.", ""]
    only = [a for a in sys.argv[1:] if not a.startswith("-")]
    for f in FIXTURES:
        if only and f[0] not in only:
            continue
        make(*f, outdir, yard)
        yard.append("")
    if not only:
        with open(os.path.join(outdir, "YARDSTICK_MORE.txt"), "w") as fh:
            fh.write("\n".join(yard))


if __name__ == "__main__":
    main()
