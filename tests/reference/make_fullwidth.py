#!/usr/bin/env python3
"""Builds the full-width fidelity fixture (tests/fixtures/golden/fullwidth/) with transformers 4.45.1.

An Asagi model at the REAL widths of Asagi-2B (SigLIP so400m vision width 1152/4304, 16 heads, 384x384 images,
729 patches; projector 1152 -> 2048 -> 2048; llm-jp-3 LLaMA width 2048/7168, 16 heads, vocab 99584) but with few
layers (vision 3, text 2). The weights are NOT committed: they come from a counter-based generator (FNV-1a of the
tensor name xor seed, splitmix64 of the element index, see `gen_tensor`) that the Rust tests re-implement
bit for bit; `tensors.json` pins the sha256 of every tensor's bf16 values. The goldens are HF's outputs computed in
float32 from those bf16 weights.

Run by hand, never by CI:
    tests/reference/.venv/bin/python tests/reference/make_fullwidth.py            # seed search + write goldens
    tests/reference/.venv/bin/python tests/reference/make_fullwidth.py --seed S   # skip the search
    tests/reference/.venv/bin/python tests/reference/make_fullwidth.py --check    # regenerate into a temp dir with
                                                            # the committed seed, compare; exit 0 = identical
    tests/reference/.venv/bin/python tests/reference/make_fullwidth.py --selftest # generator self-test only

Needs the synthetic llm-jp-sized tokenizer written by the Rust synth (tokenizer.json, tokenizer_config.json,
special_tokens_map.json; 99576 entries, <image> = 99574, <pad> = 99575): --tokenizer DIR (default /tmp/synth2b-tok).
See tests/reference/README.md, section "Full-width fixture".
"""
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_fixtures as mf  # noqa: E402  (sets the env, one torch thread, deterministic algorithms, projector patch)

import argparse  # noqa: E402
import gc  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402
from transformers import LlavaConfig, LlavaForConditionalGeneration  # noqa: E402
from transformers.modeling_utils import no_init_weights  # noqa: E402

REPO = mf.REPO
GOLDEN_DIR = REPO / "tests" / "fixtures" / "golden" / "fullwidth"
IMAGES_DIR = REPO / "tests" / "fixtures" / "images"
DEFAULT_TOKENIZER = Path("/tmp/synth2b-tok")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

PHOTO = "photo_512x341.png"
QUESTION = "この画像を説明してください。"
PROMPTS = {
    "img1": {"text": mf.asagi_prompt(QUESTION), "images": [PHOTO]},
    "text": {"text": mf.TEMPLATE_HEAD + QUESTION + mf.TEMPLATE_TAIL, "images": []},
}

# ----------------------------------------------------------------------------------------------
# config.json (the Rust synth writes the same keys and values)
# ----------------------------------------------------------------------------------------------
TEXT_HIDDEN, TEXT_FFN, TEXT_LAYERS, TEXT_HEADS, VOCAB = 2048, 7168, 2, 16, 99584
VIS_HIDDEN, VIS_FFN, VIS_LAYERS, VIS_HEADS, PATCH, IMAGE_SIZE = 1152, 4304, 3, 16, 14, 384
PROJ_HIDDEN = 2048
N_TOKENIZER = 99576  # len(tokenizer); embed_tokens / lm_head rows >= this are exactly 0
IMAGE_TOKEN, PAD_TOKEN, BOS, EOS = 99574, 99575, 1, 2
N_PATCHES = (IMAGE_SIZE // PATCH) ** 2  # 729
N_IMG = N_PATCHES - 1  # 728: strategy 'default' drops patch 0

CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": IMAGE_TOKEN,
    "model_type": "llava",
    "pad_token_id": PAD_TOKEN,
    "projector_hidden_act": "gelu",
    "projector_hidden_size": PROJ_HIDDEN,
    "text_config": {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "hidden_act": "silu",
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": TEXT_FFN,
        "max_position_embeddings": 4096,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": TEXT_HEADS,
        "num_hidden_layers": TEXT_LAYERS,
        "num_key_value_heads": TEXT_HEADS,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": VOCAB,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vision_config": {
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": VIS_HIDDEN,
        "image_size": IMAGE_SIZE,
        "intermediate_size": VIS_FFN,
        "layer_norm_eps": 1e-6,
        "model_type": "siglip_vision_model",
        "num_attention_heads": VIS_HEADS,
        "num_hidden_layers": VIS_LAYERS,
        "patch_size": PATCH,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
}
GENERATION_CONFIG = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD_TOKEN}


def config_bytes():
    return (json.dumps(CONFIG, indent=2, sort_keys=True) + "\n").encode("utf-8")


def tensor_table():
    """HF name -> PyTorch shape, exactly the tensors of the fixture (the extra head.* tensors of HF's
    SiglipVisionModel other than head.probe are not part of it)."""
    v = "vision_tower.vision_model."
    t = {
        v + "embeddings.patch_embedding.weight": (VIS_HIDDEN, 3, PATCH, PATCH),
        v + "embeddings.patch_embedding.bias": (VIS_HIDDEN,),
        v + "embeddings.position_embedding.weight": (N_PATCHES, VIS_HIDDEN),
    }
    for i in range(VIS_LAYERS):
        p = f"{v}encoder.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            t[p + ln + ".weight"] = (VIS_HIDDEN,)
            t[p + ln + ".bias"] = (VIS_HIDDEN,)
        for pr in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[p + f"self_attn.{pr}.weight"] = (VIS_HIDDEN, VIS_HIDDEN)
            t[p + f"self_attn.{pr}.bias"] = (VIS_HIDDEN,)
        t[p + "mlp.fc1.weight"] = (VIS_FFN, VIS_HIDDEN)
        t[p + "mlp.fc1.bias"] = (VIS_FFN,)
        t[p + "mlp.fc2.weight"] = (VIS_HIDDEN, VIS_FFN)
        t[p + "mlp.fc2.bias"] = (VIS_HIDDEN,)
    t[v + "post_layernorm.weight"] = (VIS_HIDDEN,)
    t[v + "post_layernorm.bias"] = (VIS_HIDDEN,)
    t[v + "head.probe"] = (1, 1, VIS_HIDDEN)
    t["multi_modal_projector.linear_1.weight"] = (PROJ_HIDDEN, VIS_HIDDEN)
    t["multi_modal_projector.linear_1.bias"] = (PROJ_HIDDEN,)
    t["multi_modal_projector.linear_2.weight"] = (TEXT_HIDDEN, PROJ_HIDDEN)
    t["multi_modal_projector.linear_2.bias"] = (TEXT_HIDDEN,)
    t["language_model.model.embed_tokens.weight"] = (VOCAB, TEXT_HIDDEN)
    for i in range(TEXT_LAYERS):
        p = f"language_model.model.layers.{i}."
        t[p + "input_layernorm.weight"] = (TEXT_HIDDEN,)
        for pr in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{pr}.weight"] = (TEXT_HIDDEN, TEXT_HIDDEN)
        t[p + "post_attention_layernorm.weight"] = (TEXT_HIDDEN,)
        t[p + "mlp.gate_proj.weight"] = (TEXT_FFN, TEXT_HIDDEN)
        t[p + "mlp.up_proj.weight"] = (TEXT_FFN, TEXT_HIDDEN)
        t[p + "mlp.down_proj.weight"] = (TEXT_HIDDEN, TEXT_FFN)
    t["language_model.model.norm.weight"] = (TEXT_HIDDEN,)
    t["language_model.lm_head.weight"] = (VOCAB, TEXT_HIDDEN)
    return t


# ----------------------------------------------------------------------------------------------
# Counter-based weight generator (bit-exact; the Rust tests implement the same)
# ----------------------------------------------------------------------------------------------
MASK64 = (1 << 64) - 1
FNV_OFFSET, FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3
GOLDEN_GAMMA, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
CHUNK = 1 << 22

GENERATOR_TEXT = (
    "per tensor (HF name, seed): h = FNV-1a 64 of the UTF-8 name (h=0xcbf29ce484222325; per byte: h^=b; "
    "h*=0x100000001b3 mod 2^64); key = h ^ seed. Element i (row-major flat index, 0-based): "
    "z = key + (i+1)*0x9E3779B97F4A7C15; z = (z^(z>>30))*0xBF58476D1CE4E5B9; z = (z^(z>>27))*0x94D049BB133111EB; "
    "z ^= z>>31 (all mod 2^64); k = (z>>40) - 2^23; u = f32(k) * 2^-23 (exact, in [-1,1)); "
    "value = f32(f32(u*amp) + offset) (two f32 roundings, no FMA); rows >= 99576 of embed_tokens/lm_head set to "
    "+0.0; stored = bf16 round-to-nearest-even of value: bf = (bits + 0x7FFF + ((bits>>16)&1)) >> 16. "
    "amp = f32(s*sqrt(3)) for 'std s', f32((g*sqrt(3))/sqrt(n)) for 'gain g, fan_in n' (float64, in that order). "
    "Rules (first match): *layer_norm1.weight, *layer_norm2.weight, *post_layernorm.weight, *input_layernorm.weight, "
    "*post_attention_layernorm.weight, *model.norm.weight: offset 1, std 0.1 | *layer_norm1.bias, *layer_norm2.bias, "
    "*post_layernorm.bias: offset 0, std 0.1 | *embeddings.patch_embedding.weight: gain 1, fan_in 588 | "
    "*embeddings.position_embedding.weight: std 0.5 | *embed_tokens.weight: std 1.0, rows >= 99576 zero | "
    "*lm_head.weight: gain 3.5, fan_in 2048, rows >= 99576 zero | *mlp.down_proj.weight: gain 0.6, fan_in shape[1] | "
    "other 2-D *.weight: gain 1, fan_in shape[1] | everything else (biases, head.probe): std 0.05 (offset 0)"
)


def fnv1a64(name):
    h = FNV_OFFSET
    for b in name.encode("utf-8"):
        h ^= b
        h = (h * FNV_PRIME) & MASK64
    return h


def tensor_rule(name, shape):
    """-> dict(offset, rule, amp (np.float32), zero_rows_from (int or None))."""
    s3 = math.sqrt(3.0)

    def std(s):
        return np.float32(s * s3), f"std {s}"

    def lecun(g, n):
        return np.float32((g * s3) / math.sqrt(n)), f"gain {g}, fan_in {n}"

    offset, zero = 0.0, None
    if name.endswith(("layer_norm1.weight", "layer_norm2.weight", "post_layernorm.weight", "input_layernorm.weight",
                      "post_attention_layernorm.weight", "model.norm.weight")):
        (amp, rule), offset = std(0.1), 1.0
    elif name.endswith(("layer_norm1.bias", "layer_norm2.bias", "post_layernorm.bias")):
        amp, rule = std(0.1)
    elif name.endswith("embeddings.patch_embedding.weight"):
        amp, rule = lecun(1.0, 588)
    elif name.endswith("embeddings.position_embedding.weight"):
        amp, rule = std(0.5)
    elif name.endswith("embed_tokens.weight"):
        (amp, rule), zero = std(1.0), N_TOKENIZER
    elif name.endswith("lm_head.weight"):
        (amp, rule), zero = lecun(3.5, 2048), N_TOKENIZER
    elif name.endswith("mlp.down_proj.weight"):
        amp, rule = lecun(0.6, shape[1])
    elif name.endswith(".weight") and len(shape) == 2:
        amp, rule = lecun(1.0, shape[1])
    else:
        amp, rule = std(0.05)
    return {"offset": offset, "rule": rule, "amp": amp, "zero_rows_from": zero}


def _uniform_chunk(key, start, n):
    """u for flat indices start..start+n-1 (np.float32, exact multiples of 2^-23)."""
    return _uniform_idx(key, np.arange(start, start + n, dtype=np.uint64))


def _uniform_idx(key, idx):
    """u for the flat indices idx (np.uint64 array)."""
    with np.errstate(over="ignore"):
        z = idx.astype(np.uint64) + np.uint64(1)
        z *= np.uint64(GOLDEN_GAMMA)
        z += np.uint64(key)
        z ^= z >> np.uint64(30)
        z *= np.uint64(MIX1)
        z ^= z >> np.uint64(27)
        z *= np.uint64(MIX2)
        z ^= z >> np.uint64(31)
        z >>= np.uint64(40)
    k = z.astype(np.int64)
    k -= 1 << 23
    return k.astype(np.float32) * np.float32(2.0 ** -23)


def f32_to_bf16_bits(v):
    bits = np.ascontiguousarray(v, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def gen_tensor(name, shape, seed):
    """-> np.uint16 array (bf16 bit patterns) of `shape`."""
    r = tensor_rule(name, shape)
    key = fnv1a64(name) ^ seed
    n = int(np.prod(shape))
    out = np.empty(n, dtype=np.uint16)
    amp, off = np.float32(r["amp"]), np.float32(r["offset"])
    for s in range(0, n, CHUNK):
        m = min(CHUNK, n - s)
        v = _uniform_chunk(key, s, m)
        v *= amp  # f32 product, rounded
        v += off  # f32 sum, rounded
        out[s:s + m] = f32_to_bf16_bits(v)
    out = out.reshape(shape)
    if r["zero_rows_from"] is not None:
        out[r["zero_rows_from"]:] = 0  # +0.0 -> bf16 0x0000
    return out


def bf16_bits_to_f32(b):
    return (b.astype(np.uint32) << np.uint32(16)).view(np.float32)


def gen_element_ref(name, shape, seed, i):
    """Pure-Python reference for one element -> bf16 bits (independent of the numpy vectorisation)."""
    r = tensor_rule(name, shape)
    if r["zero_rows_from"] is not None and i // int(np.prod(shape[1:])) >= r["zero_rows_from"]:
        return 0
    key = fnv1a64(name) ^ seed
    z = (key + (i + 1) * GOLDEN_GAMMA) & MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    z ^= z >> 31
    k = (z >> 40) - (1 << 23)
    u = np.float32(k) * np.float32(2.0 ** -23)
    p = np.float32(u * np.float32(r["amp"]))
    v = np.float32(p + np.float32(r["offset"]))
    bits = int(np.array([v], dtype=np.float32).view(np.uint32)[0])
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


def bf16_sha256(bits):
    return hashlib.sha256(np.ascontiguousarray(bits).astype("<u2").tobytes()).hexdigest()


CHECK_NAMES = ("language_model.model.norm.weight", "multi_modal_projector.linear_1.bias")


def check_values(seed, n=4):
    table = tensor_table()
    return {name: [f"0x{int(b):04x}" for b in gen_tensor(name, table[name], seed).reshape(-1)[:n]]
            for name in CHECK_NAMES}


def selftest():
    """Known vectors for FNV-1a 64 and splitmix64, and the numpy path against the pure-Python reference."""
    assert fnv1a64("") == 0xCBF29CE484222325
    assert fnv1a64("a") == 0xAF63DC4C8601EC8C
    assert fnv1a64("foobar") == 0x85944171F73967E8
    # key 0, i = 0: z = golden gamma -> splitmix64's first output from state 0
    with np.errstate(over="ignore"):
        z = np.array([GOLDEN_GAMMA], dtype=np.uint64)
        z ^= z >> np.uint64(30); z *= np.uint64(MIX1); z ^= z >> np.uint64(27); z *= np.uint64(MIX2)
        z ^= z >> np.uint64(31)
    assert int(z[0]) == 0xE220A8397B1DCDAF, hex(int(z[0]))
    # bf16 rounding: ties to even, exact values
    t = np.array([1.0, 1.00390625, 1.01171875, -2.5, 0.0, 1.0 + 2 ** -8 + 2 ** -20], dtype=np.float32)
    assert f32_to_bf16_bits(t).tolist() == [0x3F80, 0x3F80, 0x3F82, 0xC020, 0x0000, 0x3F81]
    table = tensor_table()
    rng = np.random.default_rng(7)
    for seed in (1, 2, 0xDEADBEEF12345678):
        for name in ("language_model.model.norm.weight", "multi_modal_projector.linear_1.bias",
                     "vision_tower.vision_model.embeddings.patch_embedding.weight",
                     "vision_tower.vision_model.head.probe", "language_model.model.layers.1.mlp.down_proj.weight"):
            shape = table[name]
            n = int(np.prod(shape))
            got = gen_tensor(name, shape, seed).reshape(-1)
            idx = sorted(set([0, 1, 2, 3, n - 1] + rng.integers(0, n, 20).tolist()))
            for i in idx:
                assert int(got[i]) == gen_element_ref(name, shape, seed, i), (name, seed, i)
        # zero rows and chunk boundaries of a big tensor (only the rows around them)
        for name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            shape = table[name]
            for i in (0, CHUNK - 1, CHUNK, CHUNK + 1, N_TOKENIZER * 2048 - 1, N_TOKENIZER * 2048, VOCAB * 2048 - 1):
                ref = gen_element_ref(name, shape, seed, i)
                # numpy path on the chunk that holds i
                r = tensor_rule(name, shape)
                s = (i // CHUNK) * CHUNK
                v = _uniform_chunk(fnv1a64(name) ^ seed, s, CHUNK)
                v *= np.float32(r["amp"]); v += np.float32(r["offset"])
                b = int(f32_to_bf16_bits(v)[i - s])
                if i // 2048 >= N_TOKENIZER:
                    b = 0
                assert b == ref, (name, seed, i, b, ref)
    cv = check_values(1)
    print("selftest ok; check values (seed 1):", cv, flush=True)
    return cv


def generate_weights(seed):
    """-> {name: np.uint16 bf16 bits}, in tensor-table order."""
    return {name: gen_tensor(name, shape, seed) for name, shape in tensor_table().items()}


def tensors_record(seed, weights):
    table = tensor_table()
    rec = {}
    for name, shape in table.items():
        r = tensor_rule(name, shape)
        rec[name] = {
            "shape": list(shape), "sha256": bf16_sha256(weights[name]), "offset": r["offset"], "rule": r["rule"],
            "amp": float(r["amp"]), "amp_bits": f"0x{int(np.array([r['amp']], dtype=np.float32).view(np.uint32)[0]):08x}",
        }
        if r["zero_rows_from"] is not None:
            rec[name]["zero_rows_from"] = r["zero_rows_from"]
    return rec


# ----------------------------------------------------------------------------------------------
# Image
# ----------------------------------------------------------------------------------------------
def make_photo():
    """Deterministic smooth photo-like RGB image, 512x341 -> PNG bytes."""
    w, h = 512, 341
    rng = np.random.default_rng(20250117)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    horizon = 200 + 12 * np.sin(xx / 47.0)
    sky = np.stack([70 + 90 * yy / h, 130 + 80 * yy / h, 235 - 40 * yy / h], -1)
    ground = np.stack([60 + 50 * (yy - 200) / 141 + 10 * np.sin(xx / 23.0),
                       120 - 30 * (yy - 200) / 141 + 8 * np.cos(yy / 11.0),
                       50 + 20 * np.sin((xx + yy) / 31.0)], -1)
    a = np.where((yy < horizon)[..., None], sky, ground)
    # sun with a soft halo
    d = np.hypot(xx - 400, yy - 70)
    a += (np.clip(1 - d / 90, 0, 1) ** 2)[..., None] * np.array([120, 90, 10])
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")
    dr = ImageDraw.Draw(img)
    dr.ellipse([370, 40, 430, 100], fill=(255, 236, 150))  # sun
    dr.polygon([(0, 215), (90, 120), (170, 200), (240, 140), (330, 215)], fill=(90, 100, 120))  # hills
    dr.rectangle([60, 230, 150, 310], fill=(180, 60, 50))  # house
    dr.polygon([(50, 230), (105, 185), (160, 230)], fill=(110, 40, 30))  # roof
    dr.rectangle([95, 265, 115, 310], fill=(70, 45, 30))  # door
    dr.rectangle([300, 250, 310, 320], fill=(90, 60, 30))  # tree trunk
    dr.ellipse([270, 190, 340, 265], fill=(30, 120, 40))  # tree crown
    dr.ellipse([420, 280, 490, 330], fill=(40, 90, 170))  # pond
    dr.line([(0, 335), (512, 300)], fill=(200, 190, 160), width=6)  # path
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    a = np.asarray(img, dtype=np.float64) + rng.normal(0, 1.5, (h, w, 3))
    img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "RGB")
    b = io.BytesIO()
    img.save(b, format="PNG")
    return b.getvalue()


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
def new_model():
    """LlavaForConditionalGeneration (float32) for CONFIG, weights uninitialised (filled by load_weights)."""
    cfg = LlavaConfig(**json.loads(config_bytes()))
    with no_init_weights(_enable=True):
        model = LlavaForConditionalGeneration(cfg)
    model.eval()
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


def load_weights(model, weights):
    """Copies the bf16 weights (upcast exactly) into the float32 model; HF tensors outside the table (the
    unused SigLIP head's attention/layernorm/mlp) are set to 0."""
    sd = model.state_dict()
    missing = set(weights) - set(sd)
    assert not missing, missing
    with torch.no_grad():
        for name, t in sd.items():
            if name in weights:
                assert tuple(t.shape) == weights[name].shape, (name, t.shape)
                t.copy_(torch.from_numpy(bf16_bits_to_f32(weights[name])))
            elif name.startswith("vision_tower.vision_model.head."):
                t.zero_()
            else:
                raise AssertionError(f"unexpected tensor {name}")


def write_checkpoint(d, weights, model, tok_dir):
    """bf16 safetensors checkpoint + config + tokenizer + preprocessor (a from_pretrained-able folder)."""
    import safetensors.torch
    d.mkdir(parents=True, exist_ok=True)
    sd = {}
    for name, t in model.state_dict().items():
        if name in weights:
            sd[name] = torch.from_numpy(weights[name].view(np.int16).copy()).view(torch.bfloat16)
        else:
            sd[name] = torch.zeros(t.shape, dtype=torch.bfloat16)
    safetensors.torch.save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_bytes(config_bytes())
    (d / "generation_config.json").write_bytes((json.dumps(GENERATION_CONFIG, indent=2) + "\n").encode())
    mf.image_processor(IMAGE_SIZE).save_pretrained(str(d))
    for f in TOKENIZER_FILES:
        shutil.copy(Path(tok_dir) / f, d / f)


def build_inputs(tok, proc, images_dir, pname):
    p = PROMPTS[pname]
    enc = tok(p["text"], return_tensors="pt")
    inp = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if p["images"]:
        inp["pixel_values"] = torch.cat(
            [proc(images=mf.to_rgb(mf.open_image(images_dir, n)), return_tensors="pt")["pixel_values"]
             for n in p["images"]], 0).to(torch.float32)
    return inp


def image_spans(ids, images):
    spans, pos, k = [], 0, 0
    for t in ids:
        if t == IMAGE_TOKEN:
            spans.append({"image": images[k], "start": pos, "end": pos + N_IMG})
            pos += N_IMG
            k += 1
        else:
            pos += 1
    return spans, pos


# ----------------------------------------------------------------------------------------------
# Generation cases and seed criteria
# ----------------------------------------------------------------------------------------------
GEN_CASES = [
    dict(name="greedy_text", prompt="text", kw=dict(do_sample=False, num_beams=1, max_new_tokens=16)),
    dict(name="greedy_img1", prompt="img1", kw=dict(do_sample=False, num_beams=1, max_new_tokens=16)),
    dict(name="beam5_img1_rep1.5", prompt="img1",
         kw=dict(do_sample=False, num_beams=5, repetition_penalty=1.5, length_penalty=1.0, num_return_sequences=1,
                 max_new_tokens=8)),
]
# Seed criteria, in units of logit_std (make_fixtures' definition: mean over the positions of prompt img1 of the std
# of the logits over the vocabulary; ~3.53 here).
# The brief asked for 0.05 at every greedy step and at every position of prompt 'text'. With a plain random lm_head
# over 99584 rows the top1 - top2 gap of a position is ~ Exp(mean ~0.21 logit_std): ~17-20% of positions/steps fall
# below 0.05 (measured on seed 1: text prompt 17/99 positions, greedy 3/16 and 4/16 steps), so 0.05 at all 32
# greedy steps passes ~1 seed in 1000 and at all 99 positions of 'text' ~1 in 10^8. Relaxed (see README):
GREEDY_MARGIN_MIN = 0.02  # x logit_std, top1 - top2 of the processed scores at every step of both greedy cases
BEAM_GAP_MIN = 2e-4  # x logit_std (as make_fixtures), consecutive gaps among the top 2K+1 beam candidates, every step
# coverage (as make_fixtures' coverage criteria): a random model may fall into a fixed point (one token repeated), which
# leaves the decode steps almost untested (no per-step logits are stored): each greedy case needs >= 8 distinct tokens
MIN_DISTINCT_GREEDY = 8
PROMPT_MARGIN_REF = 0.05  # not a criterion: per-position margins are recorded, positions below this are counted
MAX_SEEDS = 2000



def run_case(model, tok, proc, images_dir, case):
    inp = build_inputs(tok, proc, images_dir, case["prompt"])
    P = inp["input_ids"].shape[1]
    out, rec, _ = mf.run_generate(model, tok, inp, case["kw"])
    r = mf.generation_record(tok, out, rec, case["kw"], P)
    r.update(prompt=case["prompt"], params=case["kw"], prompt_ids=inp["input_ids"][0].tolist(),
             images=PROMPTS[case["prompt"]]["images"])
    return r


def prompt_forward(model, tok, proc, images_dir, pname):
    inp = build_inputs(tok, proc, images_dir, pname)
    with torch.no_grad():
        return model(**inp).logits[0], inp["input_ids"][0].tolist()


def case_failures(name, r, std):
    bad = []
    if "min_margin" in r and r["min_margin"] < GREEDY_MARGIN_MIN * std:
        bad.append([name, "greedy", mf.fl(r["min_margin"] / std)])
    if "margins" in r and len(set(r["new_tokens"][0])) < MIN_DISTINCT_GREEDY:
        bad.append([name, "repetitive", len(set(r["new_tokens"][0]))])
    if "min_candidate_gap" in r and r["min_candidate_gap"] < BEAM_GAP_MIN * std:
        bad.append([name, "beam", mf.fl(r["min_candidate_gap"] / std)])
    return bad


# ----------------------------------------------------------------------------------------------
# Seed search (fast path: same results as the final run, which recomputes everything with stock HF)
# ----------------------------------------------------------------------------------------------
class SearchModel:
    """One float32 model reused for every seed. Tensors are generated in stages (the text model first, the vision
    tower and projector only for seeds that pass the text-only check), embed_tokens rows are generated on demand
    (counter-based generator: any element can be computed alone), and the vision tower output is memoised per
    pixel_values (HF 4.45.1's legacy decode path reruns the tower at every step and discards the result)."""

    def __init__(self):
        self.model = new_model()
        self.table = tensor_table()
        self.sd = self.model.state_dict()
        emb = self.model.language_model.model.embed_tokens
        emb.register_forward_pre_hook(lambda mod, args: self._fill_rows(args[0]))
        self._vcache = {}
        vt = self.model.vision_tower
        orig = vt.forward

        def memo_forward(pixel_values, *a, **kw):
            key = (tuple(pixel_values.shape), a, tuple(sorted(kw.items())))
            c = self._vcache.get("last")
            if c is not None and c[0] == key and torch.equal(c[1], pixel_values):
                return c[2]
            out = orig(pixel_values, *a, **kw)
            self._vcache["last"] = (key, pixel_values.clone(), out)
            return out

        vt.forward = memo_forward
        with torch.no_grad():
            for name, t in self.sd.items():
                if name not in self.table:
                    t.zero_()

    def _fill_rows(self, ids):
        rows = sorted(set(ids.reshape(-1).tolist()) - self.rows_done)
        if not rows:
            return
        name = "language_model.model.embed_tokens.weight"
        shape = self.table[name]
        r = tensor_rule(name, shape)
        rows_a = np.array(rows, dtype=np.uint64)
        idx = (rows_a[:, None] * np.uint64(shape[1]) + np.arange(shape[1], dtype=np.uint64)[None, :]).reshape(-1)
        v = _uniform_idx(fnv1a64(name) ^ self.seed, idx)
        v *= np.float32(r["amp"])
        v += np.float32(r["offset"])
        b = f32_to_bf16_bits(v).reshape(len(rows), shape[1])
        b[rows_a >= r["zero_rows_from"]] = 0
        with torch.no_grad():
            self.sd[name][torch.tensor(rows, dtype=torch.long)] = torch.from_numpy(bf16_bits_to_f32(b))
        self.rows_done |= set(rows)

    def load(self, seed, part):
        """part 'text': every language_model.* tensor except embed_tokens (lazy); 'vision': the rest."""
        if part == "text":
            self.seed, self.rows_done = seed, set()
            self._vcache.clear()
        with torch.no_grad():
            for name, shape in self.table.items():
                is_text = name.startswith("language_model.")
                if name.endswith("embed_tokens.weight") or is_text != (part == "text"):
                    continue
                self.sd[name].copy_(torch.from_numpy(bf16_bits_to_f32(gen_tensor(name, shape, seed))))
        if part == "vision":
            self._vcache.clear()


def search_seed(tok, proc, images_dir, first=1, max_seeds=MAX_SEEDS):
    """First seed from `first` whose greedy margins and beam gaps pass (cheapest checks first)."""
    sm = SearchModel()
    log = []
    cases = {c["name"]: c for c in GEN_CASES}
    for seed in range(first, first + max_seeds):
        t0 = time.time()
        sm.load(seed, "text")
        lt, _ = prompt_forward(sm.model, tok, proc, images_dir, "text")
        std_est = mf.fl(lt.std(dim=-1).mean().item())  # logit std over prompt 'text' (img1 needs the vision tower)
        del lt
        r = run_case(sm.model, tok, proc, images_dir, cases["greedy_text"])
        # lenient pre-check with the estimate (3% slack); decided with the exact logit_std below
        bad = case_failures("greedy_text", r, std_est * 0.97)
        entry = {"seed": seed}
        if not bad:
            sm.load(seed, "vision")
            lg, _ = prompt_forward(sm.model, tok, proc, images_dir, "img1")
            std = mf.fl(lg.std(dim=-1).mean().item())
            del lg
            entry["logit_std"] = std
            bad = case_failures("greedy_text", r, std)
            for name in ("greedy_img1", "beam5_img1_rep1.5"):
                if bad:
                    break
                rr = run_case(sm.model, tok, proc, images_dir, cases[name])
                bad = case_failures(name, rr, std)
                if not bad and name == "greedy_img1":
                    entry["greedy_img1_new_tokens"] = rr["new_tokens"][0]
                if not bad and name == "beam5_img1_rep1.5":
                    entry["beam_new_tokens"] = rr["new_tokens"][0]
            if not bad:
                entry["greedy_text_new_tokens"] = r["new_tokens"][0]
        else:
            entry["logit_std_estimate"] = std_est
        entry["failures"] = bad
        log.append(entry)
        print(f"  seed {seed}: {'ok' if not bad else bad} ({time.time() - t0:.0f} s)", flush=True)
        if not bad:
            del sm
            return seed, log
    raise RuntimeError("no seed passes")


# ----------------------------------------------------------------------------------------------
# Goldens
# ----------------------------------------------------------------------------------------------
VISION_ROWS = sorted(set(range(0, N_IMG, 8)) | {N_IMG - 1, 25, 26, 27})


def npy_bytes(arr):
    arr = mf.canon_array(arr)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def top1_info(lg):
    v, i = torch.topk(lg, 2, dim=-1)
    m = v[:, 0] - v[:, 1]
    return i[:, 0].tolist(), [mf.fl(x) for x in m.tolist()]


def goldens(model, tok, proc, images_dir, std_check=None):
    """-> (goldens dict without seed/search/timings, {file: bytes}, timings)."""
    files, rec, timings = {}, {"prompts": {}}, {}
    # pixel values
    rec["pixel_values"] = {}
    for name in [PHOTO]:
        pv = proc(images=mf.to_rgb(mf.open_image(images_dir, name)), return_tensors="np")["pixel_values"][0]
        assert pv.dtype == np.float32 and pv.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        rec["pixel_values"][name] = {"shape": list(pv.shape),
                                     "sha256": hashlib.sha256(pv.astype("<f4").tobytes()).hexdigest(),
                                     "sum": float(pv.astype(np.float64).sum())}
    # vision features / projector output (the tower exactly as HF's forward calls it)
    inp = build_inputs(tok, proc, images_dir, "img1")
    with torch.no_grad():
        t0 = time.time()
        vo = model.vision_tower(inp["pixel_values"], output_hidden_states=True)
        feat = vo.hidden_states[model.config.vision_feature_layer][:, 1:]
        proj = model.multi_modal_projector(feat)
        timings["vision_tower_and_projector_s"] = round(time.time() - t0, 1)
    assert feat.shape == (1, N_IMG, VIS_HIDDEN) and proj.shape == (1, N_IMG, TEXT_HIDDEN)
    rows = torch.tensor(VISION_ROWS, dtype=torch.long)
    files["features.npy"] = npy_bytes(feat[0, rows])
    files["projected.npy"] = npy_bytes(proj[0, rows])
    rec["vision"] = {"image": PHOTO, "rows": VISION_ROWS, "n_image_tokens": N_IMG,
                     "features_shape": [len(VISION_ROWS), VIS_HIDDEN], "projected_shape": [len(VISION_ROWS), TEXT_HIDDEN],
                     "features": "vision_tower hidden_states[-2] (output of encoder layer 1 of 3, no post_layernorm) "
                                 "after strategy 'default' (patch 0 dropped), rows R of the 728",
                     "projected": "multi_modal_projector output (linear_2(gelu_erf(linear_1(x)))), rows R of the 728"}
    del vo, feat, proj
    # prompts: logits at every position, teacher-forced
    t_fwd = 0.0
    for pname, p in PROMPTS.items():
        t0 = time.time()
        lg, ids = prompt_forward(model, tok, proc, images_dir, pname)
        t_fwd += time.time() - t0
        spans, L = image_spans(ids, p["images"])
        assert lg.shape == (L, VOCAB), (lg.shape, L)
        if pname == "img1":
            rec["logit_std"] = mf.fl(lg.std(dim=-1).mean().item())
            s = spans[0]["start"]
            P = [0, s, s + N_IMG - 1, s + N_IMG, L - 2, L - 1]
        else:
            P = [0, L // 2, L - 2, L - 1]
        top1, margin = top1_info(lg)
        rec["prompts"][pname] = {
            "text": p["text"], "images": p["images"], "input_ids": ids, "prompt_length": len(ids),
            "expanded_length": L, "image_spans": spans, "logit_positions": P, "top1": top1, "top1_margin": margin,
            "min_top1_top2_margin": min(margin), "last_logits_top5": torch.topk(lg[-1], 5).indices.tolist(),
        }
        files[f"logits_{pname}.npy"] = npy_bytes(lg[torch.tensor(P, dtype=torch.long)])
        del lg
    timings["hf_forward_s"] = round(t_fwd, 1)
    std = rec["logit_std"]
    for pname in PROMPTS:
        m = rec["prompts"][pname]["top1_margin"]
        rec["prompts"][pname]["positions_below_0.05_logit_std"] = [i for i, x in enumerate(m) if x < PROMPT_MARGIN_REF * std]
        rec["prompts"][pname]["positions_below_0.02_logit_std"] = [i for i, x in enumerate(m) if x < GREEDY_MARGIN_MIN * std]
    # generation
    rec["generate"] = {}
    t0 = time.time()
    for case in GEN_CASES:
        t1 = time.time()
        r = run_case(model, tok, proc, images_dir, case)
        timings[f"generate_{case['name']}_s"] = round(time.time() - t1, 1)
        r["failures"] = case_failures(case["name"], r, std)
        if "min_margin" in r:
            r["min_margin_in_logit_std"] = mf.fl(r["min_margin"] / std)
        if "min_candidate_gap" in r:
            r["min_candidate_gap_in_logit_std"] = mf.fl(r["min_candidate_gap"] / std)
        rec["generate"][case["name"]] = r
    timings["generate_s"] = round(time.time() - t0, 1)
    return rec, files, timings


def versions():
    v = mf.versions()
    return {k: v[k] for k in ("python", "torch", "transformers", "tokenizers", "numpy", "pillow", "safetensors")}


def build_all(out, images_out, tok_dir, seed, search_log, keep_checkpoint=None):
    """Writes config.json, tensors.json, goldens.json, *.npy into `out` and the photo into `images_out`."""
    t_start = time.time()
    timings = {}
    out.mkdir(parents=True, exist_ok=True)
    images_out.mkdir(parents=True, exist_ok=True)
    (images_out / PHOTO).write_bytes(make_photo())
    tok = mf.load_tokenizer(tok_dir)
    assert len(tok) == N_TOKENIZER and tok.convert_tokens_to_ids("<image>") == IMAGE_TOKEN
    assert tok.convert_tokens_to_ids("<pad>") == PAD_TOKEN
    proc = mf.image_processor(IMAGE_SIZE)

    t0 = time.time()
    weights = generate_weights(seed)
    timings["weight_generation_s"] = round(time.time() - t0, 1)
    tens = {"seed": seed, "generator": GENERATOR_TEXT, "tensors": tensors_record(seed, weights),
            "check_values": {"seed": 1, "first_bf16_bits": check_values(1)},
            "check_values_chosen_seed": {"seed": seed, "first_bf16_bits": check_values(seed)},
            "n_tensors": len(weights), "n_values": int(sum(w.size for w in weights.values()))}
    (out / "tensors.json").write_bytes(mf.json_bytes(tens))
    (out / "config.json").write_bytes(config_bytes())

    with tempfile.TemporaryDirectory() as td:
        ck = Path(keep_checkpoint) if keep_checkpoint else Path(td) / "ckpt"
        t0 = time.time()
        write_checkpoint(ck, weights, new_model(), tok_dir)
        model = LlavaForConditionalGeneration.from_pretrained(str(ck), torch_dtype=torch.float32).eval()
        timings["checkpoint_write_and_load_s"] = round(time.time() - t0, 1)
        assert model.config._attn_implementation == "sdpa"
        sd = model.state_dict()
        for name, w in weights.items():
            assert torch.equal(sd[name], torch.from_numpy(bf16_bits_to_f32(w))), name
        del weights, sd
        tok = mf.load_tokenizer(ck)
        proc = mf.SiglipImageProcessor.from_pretrained(str(ck))
        rec, files, t = goldens(model, tok, proc, images_out)
        timings.update(t)
    del model
    rec.update(seed=seed, seed_search=search_log, config="config.json", versions=versions(),
               torch_threads=torch.get_num_threads(), image_token_id=IMAGE_TOKEN, pad_token_id=PAD_TOKEN,
               n_image_tokens=N_IMG, vocab_size=VOCAB, len_tokenizer=N_TOKENIZER,
               criteria={"unit": "logit_std", "greedy_top1_top2_margin_min": GREEDY_MARGIN_MIN,
                         "beam_candidate_gap_min": BEAM_GAP_MIN, "greedy_min_distinct_new_tokens": MIN_DISTINCT_GREEDY,
                         "prompt_margins": "recorded per position (top1_margin), not a criterion; "
                                           "positions_below_* list the small ones"},
               generation_defaults={"early_stopping": False, "eos_token_id": EOS, "pad_token_id": PAD_TOKEN,
                                    "bos_token_id": BOS, "note": "generation_config.json of the checkpoint; all "
                                    "other generate() settings are transformers 4.45.1 defaults"},
               semantics={"reference": "HF transformers 4.45.1 LlavaForConditionalGeneration.from_pretrained("
                                       "torch_dtype=float32) of the bf16 checkpoint (bf16 upcast exactly), CPU, one "
                                       "thread, sdpa, deterministic algorithms; legacy merge (one <image> id per "
                                       "image, expanded in place to 728 features)",
                          "image": "SiglipImageProcessor 384x384 bicubic (PIL, on uint8), rescale 1/255, "
                                   "normalise mean/std 0.5"})
    bad = [f for r in rec["generate"].values() for f in r["failures"]]
    assert not bad, bad
    timings["total_s"] = round(time.time() - t_start, 1)
    rec["timings"] = timings
    (out / "goldens.json").write_bytes(mf.json_bytes(rec))
    for name, data in files.items():
        (out / name).write_bytes(data)
    return rec


COMPARED_FILES = ("config.json", "tensors.json", "goldens.json", "features.npy", "projected.npy",
                  "logits_img1.npy", "logits_text.npy")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=GOLDEN_DIR)
    ap.add_argument("--images", type=Path, default=IMAGES_DIR, help="where photo_512x341.png is written")
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    ap.add_argument("--seed", type=int, default=None, help="skip the seed search")
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--check", action="store_true",
                    help="rebuild with the committed seed into a temp dir and compare with the committed files")
    ap.add_argument("--selftest", action="store_true", help="generator self-test only")
    ap.add_argument("--keep-checkpoint", type=Path, default=None, help="also keep the bf16 HF checkpoint here")
    args = ap.parse_args(argv)
    t0 = time.time()
    selftest()
    if args.selftest:
        return 0
    if args.check:
        committed = json.loads((args.out / "goldens.json").read_text(encoding="utf-8"))
        with tempfile.TemporaryDirectory() as td:
            out, img = Path(td) / "golden", Path(td) / "images"
            build_all(out, img, args.tokenizer, committed["seed"], committed["seed_search"], args.keep_checkpoint)
            diffs = []
            for f in COMPARED_FILES:
                a, b = (args.out / f).read_bytes(), (out / f).read_bytes()
                if f == "goldens.json":  # timings differ from run to run
                    ja, jb = json.loads(a), json.loads(b)
                    ja.pop("timings"), jb.pop("timings")
                    same = ja == jb
                else:
                    same = a == b
                if not same:
                    diffs.append(f)
            if (args.images / PHOTO).read_bytes() != (img / PHOTO).read_bytes():
                diffs.append(PHOTO)
        print(f"check: {'identical' if not diffs else 'DIFFERENT: ' + ', '.join(diffs)} ({time.time() - t0:.0f} s)")
        return 1 if diffs else 0
    if args.seed is not None:
        seed, log = args.seed, None
        prev = args.out / "goldens.json"
        if prev.exists():
            pj = json.loads(prev.read_text(encoding="utf-8"))
            if pj.get("seed") == seed:
                log = pj.get("seed_search")
    else:
        args.images.mkdir(parents=True, exist_ok=True)
        (args.images / PHOTO).write_bytes(make_photo())
        tok = mf.load_tokenizer(args.tokenizer)
        print("seed search", flush=True)
        ts = time.time()
        seed, log = search_seed(tok, mf.image_processor(IMAGE_SIZE), args.images, first=args.first_seed)
        gc.collect()
        log = {"tried": [e["seed"] for e in log], "chosen": seed, "search_s": round(time.time() - ts, 1),
               "log": log}
    print(f"building goldens for seed {seed}", flush=True)
    rec = build_all(args.out, args.images, args.tokenizer, seed, log, args.keep_checkpoint)
    if isinstance(log, dict):
        last = log["log"][-1]
        for k, c in (("greedy_text_new_tokens", "greedy_text"), ("greedy_img1_new_tokens", "greedy_img1"),
                     ("beam_new_tokens", "beam5_img1_rep1.5")):
            assert last[k] == rec["generate"][c]["new_tokens"][0], ("search and final run disagree", c)
    sizes = {f.name: f.stat().st_size for f in sorted(args.out.iterdir())}
    print(json.dumps({"seed": seed, "sizes": sizes, "total_bytes": sum(sizes.values()),
                      "timings": rec["timings"]}, indent=1))
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
