"""Training-recipe variants of the quick preset side by side, each with the CPU recipe's step budget, scored
on held-out studies: retrieval, rescans, collapse, and how well the finding head sees each organ's lesions.

This is the harness behind issue 14's diagnosis (bench/results/recipe_variants.json). It runs the quick
preset's recipe (DCFormer-nano at 32x64x64, SigLIP with same-findings non-negatives, finding loss, two
views with an instance loss; 2,625 steps of 32 studies) in plain PyTorch on one device, one process per
variant, so that several variants fit a short GPU lease; `voxsearch train clip` stays the product path.

    python bench/recipe_variants.py prepare --n 3000 --meta .gpu          # here: reports, labels, text features
    python bench/recipe_variants.py run --meta .gpu --variants base,organ --deadline-s 430   # on the GPU
    python bench/recipe_variants.py table RESULTS.jsonl [...]             # table + bench/results JSON

`run` renders the same phantoms from their seeds (the reports must match `prepare`'s, and are checked),
preprocesses them with the project's MONAI pipeline, and needs only torch, numpy, scipy and MONAI: the
text tower's features come from `prepare`. Variants (see VARIANTS) change one thing each against
"base", the quick preset's recipe: organ-level labels, one body part per batch, multi-scale pooling,
the finding head on the pooled tower features instead of the embedding, and the losses left out.
"""
import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
RESULTS = os.path.join(ROOT, "bench", "results", "recipe_variants.json")
# Settings reach the per-variant worker processes through the environment (set from the flags by main).
OUT = os.environ.get("OUT", "/tmp/recipe_variants")
META = os.environ.get("META", os.path.join(ROOT, ".gpu"))
SEED = int(os.environ.get("SEED", "0"))
N = int(os.environ.get("N", "3000"))
DATA = "/tmp/recipe_variants_vols.npy"
RESCAN = "/tmp/recipe_variants_rescan.npz"
T0 = float(os.environ.get("T0", time.time()))
DEV = os.environ.get("DEV", "cuda")
STEPS = int(os.environ.get("STEPS", "2625"))
DEADLINE = float(os.environ.get("DEADLINE_S", "500"))


def prepare():
    """Here, in the project's environment: the studies' reports, labels and splits, and everything
    that needs the text tower (report and query features), so that `run` needs only torch and MONAI."""
    import torch
    from voxsearch.encoders import ClipModel, TextTower, TextTowerConfig
    from voxsearch.encoders.clip import ClipConfig
    from voxsearch.ingest.catalog import parse_findings
    from voxsearch.ingest.synth import SynthConfig, _patients, render_study
    from voxsearch.training.finding_labels import FindingLabeler
    from voxsearch.training.metrics import finding_queries
    from voxsearch.training.text import token_counter, truncate_report

    os.makedirs(META, exist_ok=True)
    cfg = SynthConfig(n=N, seed=SEED, split_shares=(0.7, 0.1, 0.2))
    assign, split_of = _patients(cfg)
    rows = []
    for i in range(N):
        st = render_study(np.random.default_rng([SEED, 100, i]), "small", 0.65)
        rows.append(dict(i=i, report=st.report, findings=json.dumps(st.findings), modality=st.modality,
                         body_part=st.body_part, phase=st.phase, split=split_of[assign[i]], patient=assign[i]))
        if i % 500 == 0: print(i, flush=True)
    train = [r for r in rows if r["split"] == "train"]
    lab = FindingLabeler.from_rows(train)
    Y = np.stack([lab.vector(r) for r in rows])
    G = np.array([lab.group_id(r) for r in rows], dtype=np.int64)
    organs = sorted({l.split("|")[1] for l in lab.labels})
    O = np.stack([[float(any(f["organ"] == o for f in parse_findings(r["findings"]))) for o in organs] for r in rows])
    tower = TextTower(TextTowerConfig(max_length=64)).eval()
    cnt = token_counter(tower)
    feats = []
    with torch.inference_mode():
        for s in range(0, N, 128):
            reps = [truncate_report(r["report"], cnt, 64) for r in rows[s:s + 128]]
            tok = tower.tokenize(reps); feats.append(tower(tok["input_ids"], tok["attention_mask"]))
    feats = torch.cat(feats).numpy().astype(np.float16)
    test = [r for r in rows if r["split"] == "test"][:500]
    tf = [parse_findings(r["findings"]) for r in test]
    queries = finding_queries(tf)
    qtexts = [q.text() for q in queries]
    rel = np.array([[any(q.matches(f) for f in st) for st in tf] for q in queries])
    with torch.inference_mode():
        tok = tower.tokenize(qtexts); qfeats = tower(tok["input_ids"], tok["attention_mask"]).numpy().astype(np.float16)
    # A model only for its query parser (which of the head's labels a query names).
    m = ClipModel(ClipConfig(vision_variant="nano", embed_dim=8, text=TextTowerConfig(max_length=64),
                             finding_labels=lab.labels), load_text_weights=False)
    qlab = np.zeros((len(queries), len(lab.labels)), np.float32)
    for qi, t in enumerate(qtexts):
        for l in m.query_labels(t): qlab[qi, lab.labels.index(l)] = 1
    val = [r for r in rows if r["split"] == "validation"][:300]
    vf = [parse_findings(r["findings"]) for r in val]
    vq = finding_queries(vf)
    vrel = np.array([[any(q.matches(f) for f in st) for st in vf] for q in vq])
    with torch.inference_mode():
        tok = tower.tokenize([q.text() for q in vq]); vqfeats = tower(tok["input_ids"], tok["attention_mask"]).numpy().astype(np.float16)
    vqlab = np.zeros((len(vq), len(lab.labels)), np.float32)
    for qi, q in enumerate(vq):
        for l in m.query_labels(q.text()): vqlab[qi, lab.labels.index(l)] = 1
    np.savez_compressed(os.path.join(META, f"meta{SEED}_{N}.npz"), Y=Y, O=O, G=G, feats=feats, qfeats=qfeats, rel=rel, qlab=qlab,
                        split=np.array([r["split"] for r in rows]), body=np.array([r["body_part"] for r in rows]),
                        mod=np.array([r["modality"] for r in rows]), patient=np.array([r["patient"] for r in rows]),
                        test_idx=np.array([r["i"] for r in test]),
                        val_idx=np.array([r["i"] for r in val]), vqfeats=vqfeats, vrel=vrel, vqlab=vqlab)
    json.dump(dict(labels=lab.labels, organs=organs, qtexts=qtexts, reports=[r["report"] for r in rows],
                   findings=[r["findings"] for r in rows]), open(os.path.join(META, f"meta{SEED}_{N}.json"), "w"))
    print("labels", lab.labels, "organs", organs, "queries", len(qtexts), "Ypos", Y.sum(0))


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def _load(name, rel):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "src", "voxsearch", rel))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- data
def _one(i):
    import torch
    torch.set_num_threads(1)
    from voxsearch.ingest.synth import render_study
    from voxsearch.ingest.preprocess import PreprocessConfig, preprocess_volume
    from voxsearch.ingest.volume import HU, RAW, Volume
    st = render_study(np.random.default_rng([SEED, 100, i]), "small", 0.65)
    v = Volume(array=st.array, affine=st.affine, spacing=tuple(np.abs(np.diag(st.affine)[:3])),
               modality=st.modality, units=HU if st.modality == "CT" else RAW)
    return preprocess_volume(v, PreprocessConfig(spatial_size=(32, 64, 64))).astype(np.float16), st.report


def _rescan_one(item):
    import torch
    torch.set_num_threads(1)
    from voxsearch.ingest.preprocess import PreprocessConfig, preprocess_volume
    from voxsearch.ingest.volume import HU, RAW, Volume
    p, mod, aff, arr, _ = item
    v = Volume(array=arr, affine=aff, spacing=tuple(np.abs(np.diag(aff)[:3])), modality=mod,
               units=HU if mod == "CT" else RAW)
    return preprocess_volume(v, PreprocessConfig(spatial_size=(32, 64, 64))).astype(np.float16)


def gen():
    from multiprocessing import Pool
    import rescan
    meta = json.load(open(os.path.join(META, f"meta{SEED}_{N}.json")))
    with Pool(16) as pool:
        out = pool.map(_one, range(N), chunksize=8)
        bad = sum(r != meta["reports"][i] for i, (_, r) in enumerate(out))
        log("generated", len(out), "report mismatches", bad)
        np.save(DATA, np.stack([v for v, _ in out]))
        scans = rescan.make_pairs(32, 1234, "small", 4.0, 3.0)
        R = pool.map(_rescan_one, scans)
    np.savez(RESCAN, R=np.stack(R), P=np.array([s[0] for s in scans]))
    log("rescan pairs", len(R))
    return bad


# ---------------------------------------------------------------- timing (issue 18 / default preset)
def timing():
    import torch
    dc = _load("dcformer", "encoders/dcformer.py")
    dev = "cuda"
    res = {}
    for variant, size, bs in (("small", (128, 256, 256), 8), ("nano", (32, 64, 64), 64)):
        net = dc.dcformer(variant).to(dev).eval()
        x = torch.rand(bs, 1, *size, device=dev)
        for cl in (False, True):
            if cl:
                net = net.to(memory_format=torch.channels_last_3d)
                xx = x.contiguous(memory_format=torch.channels_last_3d)
            else:
                xx = x
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                for _ in range(3):
                    net(xx)
                torch.cuda.synchronize()
                t = time.time(); reps = 10
                for _ in range(reps):
                    net(xx)
                torch.cuda.synchronize()
            res[f"{variant}_infer_bf16_bs{bs}{'_cl' if cl else ''}_vol_s"] = round(bs * reps / (time.time() - t), 1)
        # a training step: bf16 autocast, AdamW, batch as the default preset (4) and 8
        net = dc.dcformer(variant).to(dev).train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        tb = 4 if variant == "small" else 64
        x = torch.rand(tb, 1, *size, device=dev)
        for it in range(13):
            if it == 3:
                torch.cuda.synchronize(); t = time.time()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = net(x)[-1].float().pow(2).mean()
            opt.zero_grad(); loss.backward(); opt.step()
        torch.cuda.synchronize()
        res[f"{variant}_train_bf16_bs{tb}_samples_s"] = round(tb * 10 / (time.time() - t), 1)
        res[f"{variant}_train_peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        torch.cuda.reset_peak_memory_stats()
        del net, opt, x
        torch.cuda.empty_cache()
    res["gpu"] = torch.cuda.get_device_name()
    res["torch"] = torch.__version__
    log("timing", json.dumps(res))
    with open(os.path.join(OUT, "timing.json"), "w") as fh:
        json.dump(res, fh, indent=1)


# ---------------------------------------------------------------- training variants
VARIANTS = {
    # tag: dict(organ=organ-level labels in the BCE, homo=one body part per batch, ms=embedding from
    #           mean(last) + max(stage -2) + max(stage -3), steps, stratify=batch = equal shares of body parts)
    "base": dict(),
    "organ": dict(organ=True),
    "homo": dict(homo=True),
    "organ_homo": dict(organ=True, homo=True),
    "ms": dict(ms=True),
    "organ_homo_ms": dict(organ=True, homo=True, ms=True),
    "organ_ms": dict(organ=True, ms=True),
    "base_x4": dict(steps=4 * STEPS),
    # diagnostics: why kidney/spleen lesions stay unseen
    "bce_all": dict(organ=True, siglip=False, view=0.0),
    "bce_all_pool": dict(organ=True, siglip=False, view=0.0, head_on_pool=True),
    "bce_abd": dict(organ=True, siglip=False, view=0.0, abd_only=True),
    "noview": dict(organ=True, view=0.0),
    "aux30": dict(organ=True, aux=30.0),
}


def worker(tag):
    import torch
    import torch.nn.functional as F
    from torch import nn
    cfg = dict(organ=False, homo=False, ms=False, siglip=True, head_on_pool=False, abd_only=False, steps=STEPS, bs=32, lr=2e-3, wd=0.05, aux=10.0, view=1.0,
               vtau=0.1, warm=50, eval_at=(1000, 2000, 2625, 5250, 10500))
    cfg.update(VARIANTS[tag])
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    dev = DEV
    dc = _load("dcformer", "encoders/dcformer.py")
    sig = _load("siglip", "encoders/siglip.py")
    meta = np.load(os.path.join(META, f"meta{SEED}_{N}.npz"))
    names = json.load(open(os.path.join(META, f"meta{SEED}_{N}.json")))
    X = torch.from_numpy(np.load(DATA)).to(dev)  # (N,1,32,64,64) fp16
    rs = np.load(RESCAN)
    RX = torch.from_numpy(rs["R"]).to(dev)
    RP = rs["P"]
    split, body, mod = meta["split"], meta["body"], meta["mod"]
    tr = np.flatnonzero(split == "train")
    if cfg["abd_only"]:
        tr = tr[body[tr] == "abdomen"]
    Y = torch.from_numpy(meta["Y"]).float()
    O = torch.from_numpy(meta["O"]).float()
    L = Y.shape[1]
    T = torch.cat([Y, O], 1) if cfg["organ"] else Y
    T = T.to(dev)
    G = torch.from_numpy(meta["G"]).to(dev)
    feats = torch.from_numpy(meta["feats"]).float().to(dev)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = dc.dcformer("nano", input_filter=3)
            ch = self.vision.channels
            self.vision_proj = nn.Linear(ch[-1] + (ch[-2] + ch[-3] if cfg["ms"] else 0), 128)
            self.text_proj = nn.Linear(384, 128)
            self.t_prime = nn.Parameter(torch.tensor(math.log(10)))
            self.bias = nn.Parameter(torch.tensor(-4.0))
            self.head = nn.Linear(self.vision_proj.in_features if cfg["head_on_pool"] else 128, T.shape[1])

        def pooled(self, x):
            return self.vision.feature_maps(x)[-1].mean(dim=(2, 3, 4))

        def encode_image(self, x):
            f = self.vision.feature_maps(x)
            pooled = f[-1].mean(dim=(2, 3, 4))
            if cfg["ms"]:
                pooled = torch.cat([pooled, f[-2].amax(dim=(2, 3, 4)), f[-3].amax(dim=(2, 3, 4))], 1)
            return F.normalize(self.vision_proj(pooled), dim=-1)

    model = Model().to(dev).to(memory_format=torch.channels_last_3d)
    dec = [p for n, p in model.named_parameters() if p.ndim >= 2]
    nodec = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": dec, "weight_decay": cfg["wd"]}, {"params": nodec, "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=(0.9, 0.98), eps=1e-6)
    steps = cfg["steps"]

    def lr_at(s):
        if s < cfg["warm"]:
            return (s + 1) / cfg["warm"]
        p = (s - cfg["warm"]) / max(1, steps - cfg["warm"])
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)

    def augment(x):
        # VolumeAugment on the GPU: shift <=2 voxels (zero fill), gamma, scale, offset, noise, clip.
        b = x.shape[0]
        x = x.float()
        out = torch.zeros_like(x)
        sh = torch.randint(-2, 3, (b, 3))
        for i in range(b):
            d, h, w = (int(v) for v in sh[i])
            src = x[i, :, max(0, -d):32 - max(0, d), max(0, -h):64 - max(0, h), max(0, -w):64 - max(0, w)]
            out[i, :, max(0, d):32 - max(0, -d), max(0, h):64 - max(0, -h), max(0, w):64 - max(0, -w)] = src
        g = torch.exp(torch.empty(b, device=dev).uniform_(-0.2, 0.2)).view(b, 1, 1, 1, 1)
        out = out.clamp(0, 1).pow(g)
        out = out * (1 + torch.empty(b, device=dev).uniform_(-0.1, 0.1)).view(b, 1, 1, 1, 1) \
            + torch.empty(b, device=dev).uniform_(-0.05, 0.05).view(b, 1, 1, 1, 1)
        out = out + torch.randn_like(out) * torch.empty(b, device=dev).uniform_(0, 0.02).view(b, 1, 1, 1, 1)
        return out.clamp(0, 1).contiguous(memory_format=torch.channels_last_3d)

    parts = sorted(set(body[tr]))
    by_part = {p: tr[body[tr] == p] for p in parts}
    share = np.array([len(by_part[p]) for p in parts], float)
    share /= share.sum()
    perms = {p: (rng.permutation(by_part[p]), 0) for p in parts}
    perm, pos = rng.permutation(tr), 0

    def batch():
        nonlocal perm, pos
        if cfg["homo"]:
            p = parts[rng.choice(len(parts), p=share)]
            pr, ps = perms[p]
            if ps + cfg["bs"] > len(pr):
                pr, ps = rng.permutation(by_part[p]), 0
            perms[p] = (pr, ps + cfg["bs"])
            return pr[ps:ps + cfg["bs"]]
        if pos + cfg["bs"] > len(perm):
            perm, pos = rng.permutation(tr), 0
        pos += cfg["bs"]
        return perm[pos - cfg["bs"]:pos]

    def auc(score, y):
        y = np.asarray(y, bool)
        if y.all() or not y.any():
            return float("nan")
        r = np.argsort(np.argsort(score)) + 1
        return float((r[y].sum() - y.sum() * (y.sum() + 1) / 2) / (y.sum() * (~y).sum()))

    def embed(idx_or_x):
        out = []
        with torch.no_grad(), torch.autocast(DEV, dtype=torch.bfloat16):
            for s in range(0, len(idx_or_x), 128):
                xb = idx_or_x[s:s + 128]
                xb = (X[torch.as_tensor(xb, device=dev)] if not torch.is_tensor(xb) else xb).float()
                out.append(model.encode_image(xb.contiguous(memory_format=torch.channels_last_3d)).float())
        return torch.cat(out)

    def precision(img, qf, qlab, rel, w):
        q = F.normalize(model.text_proj(qf), dim=-1)
        if w:
            dirs = F.normalize(model.head.weight[:L], dim=-1)
            q = F.normalize(q + w * (qlab @ dirs), dim=-1)
        top = torch.argsort(-(q @ img.T), dim=1)[:, :10].cpu().numpy()
        return float(np.take_along_axis(rel, top, 1).mean())

    def evaluate(step):
        model.eval()
        te, va = meta["test_idx"], meta["val_idx"]
        with torch.no_grad():
            img = embed(te)
            txt = F.normalize(model.text_proj(feats[torch.as_tensor(te, device=dev)]), dim=-1)
            S = (txt @ img.T).cpu().numpy()
            ranks = (S > np.diag(S)[:, None]).sum(1)
            vimg = embed(va)
            vq = torch.from_numpy(meta["vqfeats"]).float().to(dev)
            vl = torch.from_numpy(meta["vqlab"]).to(dev)
            ws = (0.0,) if cfg["head_on_pool"] else (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0)
            vp = {w: precision(vimg, vq, vl, meta["vrel"], w) for w in ws}
            wbest = max(ws, key=lambda w: (round(vp[w], 9), -w))
            tq = torch.from_numpy(meta["qfeats"]).float().to(dev)
            tl = torch.from_numpy(meta["qlab"]).to(dev)
            p_text = precision(img, tq, tl, meta["rel"], 0.0)
            p_best = precision(img, tq, tl, meta["rel"], wbest)
            if cfg["head_on_pool"]:
                with torch.autocast(DEV, dtype=torch.bfloat16):
                    pl = torch.cat([model.pooled(X[torch.as_tensor(te[s_:s_ + 128], device=dev)].float()
                                    .contiguous(memory_format=torch.channels_last_3d)).float() for s_ in range(0, len(te), 128)])
                probs = torch.sigmoid(model.head(pl)).cpu().numpy()
            else:
                probs = torch.sigmoid(model.head(img)).cpu().numpy()
            e = img.cpu().numpy()
            b = body[te]
            same = (b[:, None] == b[None, :]) & ~np.eye(len(te), dtype=bool)
            cos = float((e @ e.T)[same].mean())
            rv = embed(RX).cpu().numpy()
            rsim = rv @ rv.T
            np.fill_diagonal(rsim, -np.inf)
            rescan = float((RP[rsim.argmax(1)] == RP).mean())
            # similar case by scan: nearest other test study has the same finding set
            es = e @ e.T
            np.fill_diagonal(es, -np.inf)
            nn_ = es.argmax(1)
            fs = [json.dumps(sorted((f["type"], f["organ"]) for f in json.loads(names["findings"][i]))) for i in te]
            same_find = float(np.mean([fs[i] == fs[j] for i, j in enumerate(nn_)]))
        # organ-level AUC within the organ's body part (CT and all), and per label within studies that have a
        # finding in that organ
        Oi = meta["O"][te]
        organ_auc = {}
        for k, org in enumerate(names["organs"]):
            cols = [j for j, l in enumerate(names["labels"]) if l.split("|")[1] == org]
            score = probs[:, cols].max(1)
            bp = [p for p in set(b) if Oi[b == p, k].any()]
            m = np.isin(b, bp)
            organ_auc[org] = round(auc(score[m], Oi[m, k]), 3)
            mct = m & (mod[te] == "CT")
            organ_auc[org + "_CT"] = round(auc(score[mct], Oi[mct, k]), 3)
        Yt = meta["Y"][te]
        label_auc = {}
        for j, l in enumerate(names["labels"]):
            k = names["organs"].index(l.split("|")[1])
            m = Oi[:, k] > 0
            label_auc[l] = round(auc(probs[m, j], Yt[m, j]), 3)
        model.train()
        res = {"tag": tag, "step": step, "t2i_R@1": float((ranks < 1).mean()), "t2i_R@10": float((ranks < 10).mean()),
               "P@10_text": p_text, "P@10": p_best, "w": wbest, "cos_same_body": round(cos, 3), "rescan": rescan,
               "same_findings_nn": round(same_find, 3), "organ_auc": organ_auc, "label_auc": label_auc,
               "elapsed_s": round(time.time() - t_start, 1)}
        log("EVAL", json.dumps(res))
        with open(os.path.join(OUT, "results.jsonl"), "a") as fh:
            fh.write(json.dumps(res) + "\n")

    t_start = time.time()
    model.train()
    for step in range(1, steps + 1):
        idx = batch()
        it = torch.as_tensor(idx, device=dev)
        xb = X[it]
        x = torch.cat([augment(xb), augment(xb)])
        with torch.autocast(DEV, dtype=torch.bfloat16):
            if cfg["head_on_pool"]:
                pool = model.pooled(x).float()
                img = F.normalize(model.vision_proj(pool), dim=-1)
            else:
                img = model.encode_image(x).float()
        txt = F.normalize(model.text_proj(feats[it]), dim=-1)
        n = len(idx)
        loss = 0.0
        for half in (slice(0, n), slice(n, 2 * n)):
            v = img[half]
            l_ = sig.siglip_loss(v, txt, model.t_prime, model.bias, mode="siglip", groups=G[it]) if cfg["siglip"] else 0.0
            feat = pool[half] if cfg["head_on_pool"] else v
            l_ = l_ + cfg["aux"] * F.binary_cross_entropy_with_logits(model.head(feat), T[it])
            loss = loss + l_ / 2
        if cfg["view"]:
            logits = img[:n] @ img[n:].T / cfg["vtau"]
            lab = torch.arange(n, device=dev)
            loss = loss + cfg["view"] * (F.cross_entropy(logits, lab) + F.cross_entropy(logits.T, lab)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0:
            log(tag, step, f"loss {loss.item():.3f}", f"{step / (time.time() - t_start):.1f} steps/s")
        if step in cfg["eval_at"] or step == steps:
            evaluate(step)
        if time.time() - T0 > DEADLINE:
            log(tag, "deadline at step", step)
            evaluate(step)
            break
    torch.save(model.state_dict(), f"/tmp/m_{tag}.pt")


def table(paths):
    rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
    last = {}
    for r in rows:
        if r["tag"] not in last or r["step"] > last[r["tag"]]["step"]:
            last[r["tag"]] = r
    print(f"{'variant':14s} {'steps':>5s} {'t2i R@10':>8s} {'P@10':>6s} {'rescan':>6s} {'cos':>5s} "
          f"{'kidney':>6s} {'spleen':>6s} {'liver':>6s} {'brain':>6s} {'lung':>6s}  (organ AUC within body part, CT)")
    for tag, r in sorted(last.items(), key=lambda kv: -kv[1]["P@10"]):
        a = r["organ_auc"]
        print(f"{tag:14s} {r['step']:5d} {r['t2i_R@10']:8.3f} {r['P@10']:6.3f} {r['rescan']:6.2f} "
              f"{r['cos_same_body']:5.2f} {a['kidney_CT']:6.2f} {a['spleen_CT']:6.2f} {a['liver_CT']:6.2f} "
              f"{a['brain']:6.2f} {a['lung']:6.2f}")
    out = {"variants": {t: VARIANTS.get(t) for t in last}, "final": last, "history": rows}
    for p in paths:  # `run` writes the encoder timings beside its results
        timing = os.path.join(os.path.dirname(os.path.abspath(p)), "timing.json")
        if os.path.isfile(timing):
            out["timing"] = json.load(open(timing))
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS + ".tmp", "w") as fh:
        json.dump(out, fh, indent=1)
    os.replace(RESULTS + ".tmp", RESULTS)
    print(f"wrote {RESULTS}")


def main():
    global N, SEED, META, OUT, STEPS, DEADLINE, DEV
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["prepare", "gen", "time", "worker", "run", "table"])
    ap.add_argument("args", nargs="*", help="worker: a variant; table: results .jsonl files")
    ap.add_argument("--n", type=int, default=N, help="studies (the bench archive: 3000)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--meta", default=META, help="folder of prepare's files")
    ap.add_argument("--out", default=OUT, help="folder for results.jsonl, timing.json, workers.log")
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "base_x4"))
    ap.add_argument("--steps", type=int, default=STEPS, help="the CPU quick preset's budget: 2625")
    ap.add_argument("--deadline-s", type=float, default=DEADLINE, help="every worker stops and scores by then")
    ap.add_argument("--device", default=DEV)
    ap.add_argument("--no-timing", action="store_true", help="skip the encoder timings")
    a = ap.parse_args()
    os.environ.update(N=str(a.n), SEED=str(a.seed), META=a.meta, OUT=a.out, STEPS=str(a.steps),
                      DEADLINE_S=str(a.deadline_s), DEV=a.device, T0=str(T0))
    N, SEED, META, OUT, STEPS, DEADLINE, DEV = a.n, a.seed, a.meta, a.out, a.steps, a.deadline_s, a.device
    os.makedirs(OUT, exist_ok=True)
    if a.what == "prepare":
        prepare()
    elif a.what == "gen":
        gen()
    elif a.what == "time":
        timing()
    elif a.what == "worker":
        worker(a.args[0])
    elif a.what == "table":
        table(a.args)
    else:
        gen()
        if DEV == "cuda" and not a.no_timing:
            try:
                timing()
            except Exception as exc:  # the variants matter more than the timings
                log("timing failed", repr(exc))
        tags = a.variants.split(",")
        procs = [subprocess.Popen([sys.executable, __file__, "worker", t], stdout=open(f"/tmp/rv_{t}.log", "w"),
                                  stderr=subprocess.STDOUT) for t in tags]
        for p in procs:
            p.wait()
        with open(os.path.join(OUT, "workers.log"), "w") as fh:
            for t in tags:
                fh.write(open(f"/tmp/rv_{t}.log").read())


if __name__ == "__main__":
    main()
