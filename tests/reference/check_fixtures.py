#!/usr/bin/env python3
"""Reloads the committed fixtures and reproduces every golden with HF transformers 4.45.1, then checks the
model goldens against an independent numpy (float64) implementation of the Asagi forward pass written from
docs/spec (asagi-model.md §5-§9), not from HF's modeling code.

    tests/reference/.venv/bin/python tests/reference/check_fixtures.py [--fixtures DIR]

Exit status 0 iff everything matches. Tolerances: ids/strings exact; floats 1e-6 relative (HF reproduction on
the same stack); numpy f64 vs HF f32 logits: max |diff| <= 2e-4 * max|logit|.
"""
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_fixtures as mf  # noqa: E402  (sets env, threads and determinism before torch is used)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

REL = 1e-6
NP_TOL = 2e-4

failures = []
checks = 0


def fail(msg):
    failures.append(msg)
    print("FAIL:", msg, flush=True)


def ok(cond, msg):
    global checks
    checks += 1
    if not cond:
        fail(msg)
    return cond


# ----------------------------------------------------------------------------------------------
# comparison helpers
# ----------------------------------------------------------------------------------------------
def cmp_json(a, b, path=""):
    global checks
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            fail(f"{path}: keys differ: {sorted(set(a) ^ set(b))}")
            return
        for k in a:
            cmp_json(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            fail(f"{path}: length {len(a)} != {len(b)}")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            cmp_json(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        checks += 1
        if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            fail(f"{path}: {a!r} != {b!r}")
        elif abs(a - b) > REL * max(1.0, abs(a), abs(b)):
            fail(f"{path}: {a!r} != {b!r}")
    else:
        checks += 1
        if a != b or type(a) is not type(b):
            fail(f"{path}: {a!r} != {b!r}")


def cmp_array(rel, got, fixtures):
    global checks
    checks += 1
    want = np.load(fixtures / rel)
    got = mf.canon_array(got)
    if got.shape != want.shape or got.dtype != want.dtype:
        fail(f"{rel}: shape/dtype {got.shape} {got.dtype} != {want.shape} {want.dtype}")
        return
    if want.dtype.kind == "f":
        finite = np.isfinite(want)
        if not np.array_equal(finite, np.isfinite(got)) or not np.array_equal(want[~finite], got[~finite]):
            fail(f"{rel}: non-finite entries differ")
            return
        if finite.any():
            scale = max(1.0, float(np.abs(want[finite]).max()))
            d = float(np.abs(want[finite].astype(np.float64) - got[finite]).max())
            if d > REL * scale:
                fail(f"{rel}: max abs diff {d:.3g} (scale {scale:.3g})")
    elif not np.array_equal(want, got):
        fail(f"{rel}: integer arrays differ")


# ----------------------------------------------------------------------------------------------
# independent numpy implementation (float64)
# ----------------------------------------------------------------------------------------------
_erf = np.vectorize(math.erf)


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def softmax(x, axis=-1):
    x = x - x.max(axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis, keepdims=True)


def log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


class NumpyAsagi:
    def __init__(self, model_dir):
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        self.cfg = cfg
        sd = load_file(str(Path(model_dir) / "model.safetensors"))
        self.w = {k: v.to(torch.float64).numpy() for k, v in sd.items()}
        vc, tc = cfg["vision_config"], cfg["text_config"]
        self.vc, self.tc = vc, tc
        self.n_side = vc["image_size"] // vc["patch_size"]
        self.n_used = vc["num_hidden_layers"] + cfg.get("vision_feature_layer", -2) + 1
        self.strategy = cfg.get("vision_feature_select_strategy", "default")

    def vision(self, pv):
        """pv [3,S,S] -> (features after select [N,Dv], projected [N,H])."""
        w, vc, n, p = self.w, self.vc, self.n_side, self.vc["patch_size"]
        pre = "vision_tower.vision_model."
        x = pv[:, : n * p, : n * p].astype(np.float64)  # conv 'valid': trailing pixels are unused
        patches = x.reshape(3, n, p, n, p).transpose(1, 3, 0, 2, 4).reshape(n * n, 3 * p * p)
        D = vc["hidden_size"]
        h = patches @ w[pre + "embeddings.patch_embedding.weight"].reshape(D, -1).T + w[pre + "embeddings.patch_embedding.bias"]
        h = h + w[pre + "embeddings.position_embedding.weight"]
        nh = vc["num_attention_heads"]
        hd = D // nh
        eps = vc.get("layer_norm_eps", 1e-6)
        for i in range(self.n_used):
            q_ = pre + f"encoder.layers.{i}."
            a = layer_norm(h, w[q_ + "layer_norm1.weight"], w[q_ + "layer_norm1.bias"], eps)
            q = (a @ w[q_ + "self_attn.q_proj.weight"].T + w[q_ + "self_attn.q_proj.bias"]).reshape(-1, nh, hd)
            k = (a @ w[q_ + "self_attn.k_proj.weight"].T + w[q_ + "self_attn.k_proj.bias"]).reshape(-1, nh, hd)
            v = (a @ w[q_ + "self_attn.v_proj.weight"].T + w[q_ + "self_attn.v_proj.bias"]).reshape(-1, nh, hd)
            att = softmax(np.einsum("qhd,khd->hqk", q, k) * hd ** -0.5)
            o = np.einsum("hqk,khd->qhd", att, v).reshape(-1, D)
            h = h + o @ w[q_ + "self_attn.out_proj.weight"].T + w[q_ + "self_attn.out_proj.bias"]
            a = layer_norm(h, w[q_ + "layer_norm2.weight"], w[q_ + "layer_norm2.bias"], eps)
            f = a @ w[q_ + "mlp.fc1.weight"].T + w[q_ + "mlp.fc1.bias"]
            f = 0.5 * f * (1 + np.tanh(math.sqrt(2 / math.pi) * (f + 0.044715 * f ** 3)))  # gelu_pytorch_tanh
            h = h + f @ w[q_ + "mlp.fc2.weight"].T + w[q_ + "mlp.fc2.bias"]
        if self.strategy == "default":
            h = h[1:]
        y = h @ w["multi_modal_projector.linear_1.weight"].T + w["multi_modal_projector.linear_1.bias"]
        y = 0.5 * y * (1 + _erf(y / math.sqrt(2)))  # exact GELU
        y = y @ w["multi_modal_projector.linear_2.weight"].T + w["multi_modal_projector.linear_2.bias"]
        return h, y

    def embed(self, ids, image_feats):
        """Old LLaVA merge: each <image> id replaced in place by the next image's N features."""
        E = self.w["language_model.model.embed_tokens.weight"]
        rows, k = [], 0
        for t in ids:
            if t == self.cfg["image_token_index"]:
                rows.append(image_feats[k])
                k += 1
            else:
                rows.append(E[t][None])
        assert k == len(image_feats), "number of <image> tokens != number of images"
        return np.concatenate(rows, 0)

    def llm(self, x):
        """x [L,H] -> logits [L,V]; positions 0..L-1, causal."""
        w, tc = self.w, self.tc
        L, H = x.shape
        nh, nkv = tc["num_attention_heads"], tc.get("num_key_value_heads") or tc["num_attention_heads"]
        hd = tc.get("head_dim") or H // nh
        eps = tc["rms_norm_eps"]
        inv = 1.0 / (tc.get("rope_theta", 10000.0) ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
        ang = np.arange(L, dtype=np.float64)[:, None] * inv[None]
        cos = np.cos(np.concatenate([ang, ang], -1))[:, None, :]
        sin = np.sin(np.concatenate([ang, ang], -1))[:, None, :]

        def rope(t):
            t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
            return t * cos + np.concatenate([-t2, t1], -1) * sin

        mask = np.triu(np.full((L, L), -np.inf), 1)
        for i in range(tc["num_hidden_layers"]):
            p = f"language_model.model.layers.{i}."
            a = rms_norm(x, w[p + "input_layernorm.weight"], eps)
            q = rope((a @ w[p + "self_attn.q_proj.weight"].T).reshape(L, nh, hd))
            k = rope((a @ w[p + "self_attn.k_proj.weight"].T).reshape(L, nkv, hd))
            v = (a @ w[p + "self_attn.v_proj.weight"].T).reshape(L, nkv, hd)
            rep = nh // nkv
            k = np.repeat(k, rep, axis=1)
            v = np.repeat(v, rep, axis=1)
            att = softmax(np.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask[None])
            o = np.einsum("hqk,khd->qhd", att, v).reshape(L, nh * hd)
            x = x + o @ w[p + "self_attn.o_proj.weight"].T
            a = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
            g = a @ w[p + "mlp.gate_proj.weight"].T
            u = a @ w[p + "mlp.up_proj.weight"].T
            x = x + ((g / (1 + np.exp(-g))) * u) @ w[p + "mlp.down_proj.weight"].T
        x = rms_norm(x, w["language_model.model.norm.weight"], eps)
        return x @ w["language_model.lm_head.weight"].T


def rep_penalty(scores, ids, theta):
    s = scores.copy()
    u = np.unique(np.asarray(ids))
    v = s[u]
    s[u] = np.where(v < 0, v * theta, v / theta)
    return s


def check_numpy(vname, fixtures, goldens):
    mdir = fixtures / "models" / vname
    npm = NumpyAsagi(mdir)
    g = f"golden/{vname}"
    size = goldens["image_size"]
    N = goldens["n_image_tokens"]
    feats = {}
    for name in sorted(mf.IMAGES):
        pv = np.load(fixtures / f"golden/preprocess/s{size}/{name}.pixel_values.npy")
        f, y = npm.vision(pv)
        feats[name] = y
        for suffix, arr in (("features", f), ("projected", y)):
            want = np.load(fixtures / f"{g}/vision/{name}.{suffix}.npy")
            d = np.abs(want - arr).max() / max(1.0, np.abs(want).max())
            ok(arr.shape == want.shape and d < NP_TOL, f"{vname} numpy vision {name}.{suffix}: rel diff {d:.3g}")
    worst = 0.0
    for pname, pr in goldens["prompts"].items():
        x = npm.embed(pr["input_ids"], [feats[n] for n in pr["images"]])
        logits = npm.llm(x)
        want = np.load(fixtures / f"{g}/logits/{pname}.npy")
        d = np.abs(want - logits).max() / np.abs(want).max()
        worst = max(worst, d)
        ok(logits.shape == want.shape and d < NP_TOL, f"{vname} numpy logits {pname}: rel diff {d:.3g}")
    # generation: teacher-forced replay of every returned sequence
    eos = 2
    for cname, r in goldens["generate"].items():
        params = r["params"]
        imgs = [feats[n] for n in r["images"]]
        P = len(r["prompt_ids"])
        theta = params.get("repetition_penalty", 1.0)
        K = params.get("num_beams", 1)
        for si, seq in enumerate(r["sequences"]):
            new = seq[P:]
            if eos in new:
                new = new[: new.index(eos) + 1]
            ids = r["prompt_ids"] + new
            logits = npm.llm(npm.embed(ids[:-1], imgs))
            off = len(logits) - len(new)  # position predicting new[0]
            total = 0.0
            for t, tokid in enumerate(new):
                raw = logits[off + t]
                hist = ids[: P + t]
                if K == 1:
                    s = rep_penalty(raw, hist, theta) if theta != 1.0 else raw
                    top = np.argsort(-s)[:2]
                    ok(top[0] == tokid, f"{vname} numpy greedy {cname} step {t}: argmax {top[0]} != {tokid}")
                else:
                    lp = log_softmax(raw)
                    lp = rep_penalty(lp, hist, theta) if theta != 1.0 else lp
                    total += lp[tokid]
            if K > 1:
                score = total / (len(new) ** params.get("length_penalty", 1.0))
                want = r["sequences_scores"][si]
                ok(abs(score - want) < 1e-4, f"{vname} numpy beam {cname} seq {si}: score {score:.6f} != {want:.6f}")
    # traces: raw logits of every row at every step = numpy logits of that row's history
    for tname, tr in goldens.get("traces", {}).items():
        raw = np.load(fixtures / f"{g}/traces/{tname}/raw_logits.npy")
        imgs = [feats[n] for n in tr["images"]]
        ok(len(tr["step_input_ids"]) == raw.shape[0], f"{vname} trace {tname}: step count")
        for t, rows in enumerate(tr["step_input_ids"]):
            for r, ids in enumerate(rows):
                lg = npm.llm(npm.embed(ids, imgs))[-1]
                d = np.abs(lg - raw[t, r]).max() / np.abs(raw[t, r]).max()
                worst = max(worst, d)
                ok(d < NP_TOL, f"{vname} numpy trace {tname} step {t} row {r}: rel diff {d:.3g}")
    print(f"  numpy f64 forward vs HF f32: worst relative logits diff {worst:.2e}", flush=True)


def check_expanded_path(vname, fixtures, goldens, tok):
    """HF's non-legacy path (processor-style: N <image> ids per image, masked_scatter) must give the same logits
    as the legacy in-place merge used for the goldens."""
    model = mf.load_model(fixtures / "models" / vname)
    proc = mf.SiglipImageProcessor.from_pretrained(str(fixtures / "models" / vname))
    N = goldens["n_image_tokens"]
    model.config.image_seq_length = N
    for pname in ("img1", "img2"):
        inp = mf.build_inputs(tok, proc, fixtures / "images", pname, torch.float32)
        ids = []
        for t in inp["input_ids"][0].tolist():
            ids += [t] * N if t == model.config.image_token_index else [t]
        ids = torch.tensor([ids])
        with torch.no_grad():
            lg = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inp["pixel_values"]).logits[0]
        want = np.load(fixtures / f"golden/{vname}/logits/{pname}.npy")
        d = float(np.abs(want - lg.numpy()).max())
        ok(d <= 1e-4, f"{vname} expanded-ids path {pname}: max abs diff {d:.3g}")


# ----------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fixtures", type=Path, default=mf.DEFAULT_OUT)
    args = ap.parse_args()
    fx = args.fixtures
    manifest = json.loads((fx / "manifest.json").read_text(encoding="utf-8"))
    cur = mf.versions()
    for k, v in manifest["versions"].items():
        if cur.get(k) != v:
            print(f"WARNING: {k} {cur.get(k)} != {v} (manifest)")

    print("files and hashes", flush=True)
    on_disk = sorted(str(p.relative_to(fx)) for p in fx.rglob("*") if p.is_file() and p.name != "manifest.json")
    ok(on_disk == sorted(manifest["files"]), f"file set differs from manifest: {sorted(set(on_disk) ^ set(manifest['files']))}")
    for rel, d in manifest["files"].items():
        if (fx / rel).exists():
            ok(mf.sha256(fx / rel) == d["sha256"], f"{rel}: sha256 differs from manifest")

    print("tokenizer", flush=True)
    tok = mf.load_tokenizer(fx / "tokenizer")
    cmp_json(mf.tokenizer_goldens(tok, fx / "tokenizer/spiece.model"),
             json.loads((fx / "golden/tokenizer_cases.json").read_text(encoding="utf-8")), "tokenizer_cases")
    tok2 = mf.PreTrainedTokenizerFast(tokenizer_file=str(fx / "tokenizer/llmjp-style/tokenizer.json"),
                                      bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                      clean_up_tokenization_spaces=False)
    cmp_json(mf.tokenizer_goldens(tok2),
             json.loads((fx / "golden/tokenizer_cases_llmjp_style.json").read_text(encoding="utf-8")),
             "tokenizer_cases_llmjp_style")
    # the spm model reproduces itself from the corpus
    ok(mf.train_spm(HERE / "corpus.txt") == (fx / "tokenizer/spiece.model").read_bytes(),
       "retraining the SentencePiece model from corpus.txt gives different bytes")

    print("preprocessing", flush=True)
    sizes = sorted({v["dims"]["image_size"] for v in manifest["variants"].values()})
    prec, parr = mf.preprocess_goldens(fx / "images", sizes)
    cmp_json(prec, json.loads((fx / "golden/preprocess.json").read_text(encoding="utf-8")), "preprocess")
    for rel, (a, _) in parr.items():
        cmp_array(rel, a, fx)
    imgs = mf.make_images()
    for name, data in imgs.items():
        ok(data == (fx / "images" / name).read_bytes(), f"images/{name}: regenerated bytes differ")

    for vname in manifest["variants"]:
        print(f"variant {vname}: HF reproduction", flush=True)
        rec, arrs = mf.variant_goldens(vname, fx / "models" / vname, fx / "images", tok,
                                       traces=(vname == mf.TRACE_VARIANT))
        want = json.loads((fx / f"golden/{vname}/goldens.json").read_text(encoding="utf-8"))
        cmp_json(rec, want, f"{vname}/goldens")
        for rel, (a, _) in arrs.items():
            cmp_array(rel, a, fx)
        ok(not mf.check_margins(rec["generate"], rec["logit_std"], mf.prompt_margins(rec)), f"{vname}: margins below thresholds")
        print(f"variant {vname}: independent numpy forward", flush=True)
        check_numpy(vname, fx, want)
        print(f"variant {vname}: processor-style expanded ids", flush=True)
        check_expanded_path(vname, fx, want, tok)

    print(f"{checks - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
