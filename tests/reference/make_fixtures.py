#!/usr/bin/env python3
"""Builds the committed fixtures of asagi-gguf (tests/fixtures/**) with transformers 4.45.1.

Run by hand, never by CI:   tests/reference/.venv/bin/python tests/reference/make_fixtures.py [--out DIR]

Everything is deterministic (fixed seeds, one thread, sorted JSON, no timestamps): two runs give
byte-identical files. check_fixtures.py reloads the committed files and reproduces every golden.
See tests/reference/README.md for the layout and the meaning of every file.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("PYTHONHASHSEED", "0")

import argparse
import copy
import hashlib
import io
import json
import math
import re
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

import PIL
import PIL.features
import safetensors
import sentencepiece as spm
import tokenizers
import transformers
from PIL import Image, ImageDraw
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaTokenizerFast,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    SiglipImageProcessor,
    SiglipVisionConfig,
)
from transformers.activations import ACT2FN
from transformers.models.llava import modeling_llava

transformers.logging.set_verbosity_error()

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_OUT = REPO / "tests" / "fixtures"

EXPECTED_VERSIONS = {"transformers": "4.45.1", "torch": "2.4.0"}


# ----------------------------------------------------------------------------------------------
# Asagi's projector (remote code reads config.projector_hidden_size; stock 4.45.1 hard-codes the
# text hidden size).  Same attribute names as LlavaMultiModalProjector, so the tensor names are
# multi_modal_projector.linear_{1,2}.{weight,bias} as in Asagi.
# ----------------------------------------------------------------------------------------------
class AsagiMultiModalProjector(nn.Module):
    def __init__(self, config):
        super().__init__()
        p = getattr(config, "projector_hidden_size", None) or config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, p, bias=True)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(p, config.text_config.hidden_size, bias=True)

    def forward(self, image_features):
        return self.linear_2(self.act(self.linear_1(image_features)))


modeling_llava.LlavaMultiModalProjector = AsagiMultiModalProjector


# ----------------------------------------------------------------------------------------------
# Constants: tokenizer, prompts, images, variants
# ----------------------------------------------------------------------------------------------
SPM_VOCAB = 1200
SPM_SEED = 1234
LLMJP_SPECIALS = ["<MASK|LLM-jp>", "<PAD|LLM-jp>", "<CLS|LLM-jp>", "<SEP|LLM-jp>", "<EOD|LLM-jp>"]
SPM_TRAINER_ARGS = dict(
    model_type="unigram",
    vocab_size=SPM_VOCAB,
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=True,
    split_digits=True,
    character_coverage=0.98,
    allow_whitespace_only_pieces=True,
    max_sentencepiece_length=16,
    num_threads=1,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    control_symbols=LLMJP_SPECIALS,
    minloglevel=2,
)

TEMPLATE_HEAD = "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。\n\n### 指示:\n"
TEMPLATE_TAIL = "\n\n### 応答:\n"


def asagi_prompt(question, n_images=1):
    """asagi-model.md §11 template; one `<image>\\n` per image right after `### 指示:\\n`."""
    return TEMPLATE_HEAD + "<image>\n" * n_images + question + TEMPLATE_TAIL


PROMPTS = {
    "img1": {
        "text": asagi_prompt("この画像には何が写っていますか？"),
        "images": ["rgb_80x60.png"],
        "description": "Asagi template, one image",
    },
    "img2": {
        "text": asagi_prompt("二枚の画像の違いを説明してください。", n_images=2),
        "images": ["rgb_80x60.png", "rgba_64x48.png"],
        "description": "Asagi template with two <image> tokens and two images (in order)",
    },
    "text": {
        "text": TEMPLATE_HEAD + "日本の首都はどこですか？ Answer in English." + TEMPLATE_TAIL,
        "images": [],
        "description": "Asagi template without an image (text only)",
    },
}

TOKENIZER_CASES = [
    ("ja_basic", "こんにちは、世界！"),
    ("en_basic", "Hello, world!"),
    ("mixed", "日本語と English が混ざった文章です。"),
    ("leading_spaces", "  two leading spaces"),
    ("trailing_spaces", "trailing spaces   "),
    ("multiple_spaces", "multiple    spaces   inside"),
    ("single_space", " "),
    ("empty", ""),
    ("newlines", "line1\nline2\n\nline4"),
    ("leading_newline", "\n先頭が改行"),
    ("only_newline", "\n"),
    ("crlf", "windows\r\nnewline"),
    ("tabs", "tab\tseparated\tvalues\t"),
    ("emoji", "絵文字😀👍🎉と🦊"),
    ("emoji_zwj", "家族👨‍👩‍👧です"),
    ("fullwidth", "全角ＡＢＣ１２３　全角スペース"),
    ("halfwidth_kana", "半角ｶﾀｶﾅと全角カタカナ"),
    ("ideographic_space", "\u3000字下げ"),
    ("absent_chars", "absent: 鬱 齟齬 Ω ∮ ☃ ᚠ"),
    ("combining", "e\u0301 vs \u00e9"),
    ("control_chars", "a\u0000b\u0007c"),
    ("digits", "数字123456と3.14159、2024年10月1日"),
    ("meta_symbol", "\u2581already has the meta symbol"),
    ("cleanup_spaces", "Hello , world . I do n't know ."),
    ("image_first", "<image>\nこの画像には何が写っていますか？"),
    ("image_inside", "text before <image> text after"),
    ("image_twice", "<image><image>\n二枚"),
    ("not_special", "<imag> <image2> < image > <IMAGE>"),
    ("literal_specials", "<s>literal</s> <pad> <PAD|LLM-jp> <EOD|LLM-jp>"),
    ("code", "def f(x):\n    return x * 2\n"),
    ("url", "https://example.com/path?q=1&x=2"),
    ("repeat", "ああああああああああああ"),
    ("asagi_template", asagi_prompt("この画像には何が写っていますか？")),
    ("asagi_template_2img", asagi_prompt("二枚の画像の違いを説明してください。", n_images=2)),
]

# name -> (builder, what it tests)
IMAGES = {
    "rgb_80x60.png": "RGB PNG 80x60, landscape, downscaled to the target",
    "rgb_30x45.jpg": "RGB JPEG 30x45 (quality 90), portrait and smaller than the target: upscaling",
    "gray_70x50.png": "grayscale (mode L) PNG 70x50",
    "rgba_64x48.png": "RGBA PNG 64x48, alpha 0/96/255 stripes, nonzero RGB under transparent pixels",
    "palette_50x40.png": "palette (mode P, 16 colours) PNG 50x40",
    "rgb_56x56.png": "RGB PNG 56x56: exactly the 56x56 target (resize is a no-op there)",
    "rgb_200x120.png": "RGB PNG 200x120: strong antialiased downscale",
    # JPEG variants (make_jpeg_images): photo-like content (smooth gradients + hard-edged saturated shapes + mild
    # noise), sizes not multiples of 8/16 (partial MCUs at the right and bottom edges). Goldens = Pillow's
    # (bundled libjpeg-turbo) Image.open(f).convert("RGB"): ISLOW IDCT, fancy upsampling, no EXIF rotation.
    "jpeg_420_97x61.jpg": "JPEG baseline q90 4:2:0 (Y 2x2, Cb/Cr 1x1), 97x61",
    "jpeg_422_83x57.jpg": "JPEG baseline q90 4:2:2 (Y 2x1, Cb/Cr 1x1), 83x57",
    "jpeg_444_71x49.jpg": "JPEG baseline q90 4:4:4 (all 1x1), 71x49",
    "jpeg_prog_99x67.jpg": "JPEG progressive q90 4:2:0 (SOF2, Huffman-optimized), 99x67",
    "jpeg_gray_65x43.jpg": "JPEG grayscale (1 component, mode L) q90, 65x43",
    "jpeg_cmyk_59x41.jpg": "JPEG CMYK (4 components ids C/M/Y/K, all 1x1) q90 as Pillow writes it: Adobe APP14 "
                           "transform 0 (no colour transform), samples stored inverted (Adobe polarity); Pillow mode "
                           "CMYK (rawmode CMYK;I), convert('RGB') = (255-C)(255-K)/255 (MULDIV255)",
    "jpeg_ycck_59x41.jpg": "JPEG YCCK (Adobe APP14 transform 2, component ids 1..4, all 1x1) q90: Pillow cannot "
                           "encode YCCK, so this is a Pillow CMYK JPEG of precomputed Y/Cb/Cr/K planes with the APP14 "
                           "transform byte set to 2 and the SOF/SOS component ids set to 1..4 (see "
                           "make_jpeg_images); libjpeg decodes YCCK->CMYK, Pillow mode CMYK",
    "jpeg_exif6_61x83.jpg": "JPEG baseline q90 4:2:0 61x83 with EXIF orientation 6 (APP1); golden = the stored "
                            "(unrotated) pixels: Image.open + convert('RGB') ignores the orientation",
    "jpeg_restart_90x70.jpg": "JPEG baseline q90 4:2:0 90x70 with restart markers every 4 MCUs (DRI 4; 6x5 MCUs, "
                              "intervals not aligned to MCU rows)",
    "jpeg_q30_113x77.jpg": "JPEG baseline q30 4:2:0 113x77: strong artifacts, saturated colours next to black/white "
                           "(YCbCr->RGB clips)",
    "jpeg_420_640x480.jpg": "JPEG baseline q85 4:2:0 640x480, larger photo-like image",
}

TEXT_HIDDEN = 256
TEXT_LAYERS = 2
TEXT_HEADS = 4
TEXT_FFN = 352
VISION_HIDDEN = 64
VISION_HEADS = 4
VISION_LAYERS = 3
VISION_FFN = 144
PATCH = 14
MAX_POS = 512

VARIANTS = {
    "base-default-f32": dict(
        dtype="float32", strategy="default", projector_mult=1, kv_heads=4, vocab_pad_to=None,
        image_size=56, garbage_unused=False,
        tests="select strategy 'default' (drops patch 0), projector hidden = text hidden, MHA, float32, "
              "vocab = len(tokenizer); also carries the sampling/beam replay traces",
    ),
    "full-gqa-expand-f16": dict(
        dtype="float16", strategy="full", projector_mult=2, kv_heads=2, vocab_pad_to=None,
        image_size=64, garbage_unused=False,
        tests="select strategy 'full' (keeps patch 0), projector hidden = 2x text hidden, GQA (4 q heads, 2 kv heads), "
              "float16, image_size 64 not a multiple of patch 14 (conv drops the last 8 pixel rows/cols)",
    ),
    "bf16-padvocab": dict(
        dtype="bfloat16", strategy="default", projector_mult=1, kv_heads=4, vocab_pad_to=128,
        image_size=56, garbage_unused=True,
        tests="bfloat16 as Asagi ships; embed/lm_head rows padded to a multiple of 128 beyond len(tokenizer); "
              "unused vision tensors (last layer, post_layernorm, head) are NaN like uninitialised memory; "
              "reference = bf16 weights computed in float32, stock bf16 output kept for information",
    ),
}

# Margins, in units of the variant's logit std (logit_std(): mean over the positions of prompt img1 of the std of
# the logits over the vocabulary; ~3.6).
# top-1 - top-2 of the processed scores at every greedy step >= 0.05 * logit std; >= 0.1 * logit std for greedy_text,
# the continuation the Rust tests also run through the Q8_0 file (Q8_0 moves a top-1 - top-2 gap by ~0.025 std, rms)
GREEDY_MARGIN_MIN = {"*": 0.05, "greedy_text": 0.1}
BEAM_GAP_MIN = 2e-4  # gap between consecutive beam candidates (log-prob) at every beam step >= 2e-4 * logit std
# teacher-forced: top-1 - top-2 of the logits at every position of these prompts >= 0.05 * logit std ('text' is the
# prompt the Rust LLM parity tests run through the F16/Q8_0/Q4 files)
PROMPT_MARGIN_MIN = 0.05
PROMPT_MARGIN_PROMPTS = ("text",)
# each group of greedy continuations must differ (the images and the question matter)
DISTINCT_GREEDY = (("greedy_img1", "greedy_img2", "greedy_text"),)
# no greedy run may stop before its 4th token, greedy_text (the Rust parity tests' continuation) not before its 8th
MIN_GREEDY_STEPS = {"*": 4, "greedy_text": 8}
EOS_ID = 2

MAX_NEW_GREEDY = 16
MAX_NEW_BEAM = 12

GEN_CASES = [
    dict(name="greedy_img1", prompt="img1", kw=dict(do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_GREEDY)),
    dict(name="greedy_img2", prompt="img2", kw=dict(do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_GREEDY)),
    dict(name="greedy_text", prompt="text", kw=dict(do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_GREEDY)),
    dict(name="greedy_img1_rep1.5", prompt="img1",
         kw=dict(do_sample=False, num_beams=1, repetition_penalty=1.5, max_new_tokens=MAX_NEW_GREEDY)),
    dict(name="beam3_img1_rep1.5_lp1.0", prompt="img1",
         kw=dict(do_sample=False, num_beams=3, repetition_penalty=1.5, length_penalty=1.0,
                 num_return_sequences=2, max_new_tokens=MAX_NEW_BEAM)),
    dict(name="beam5_img1_rep1.5_lp0.6", prompt="img1",
         kw=dict(do_sample=False, num_beams=5, repetition_penalty=1.5, length_penalty=0.6,
                 num_return_sequences=2, max_new_tokens=MAX_NEW_BEAM)),
    dict(name="beam3_img2_rep1.5_lp1.0", prompt="img2",
         kw=dict(do_sample=False, num_beams=3, repetition_penalty=1.5, length_penalty=1.0,
                 num_return_sequences=2, max_new_tokens=MAX_NEW_BEAM)),
    dict(name="beam5_img2_rep1.5_lp0.6", prompt="img2",
         kw=dict(do_sample=False, num_beams=5, repetition_penalty=1.5, length_penalty=0.6,
                 num_return_sequences=2, max_new_tokens=MAX_NEW_BEAM)),
    dict(name="beam5_text_rep1.5_lp0.6", prompt="text",
         kw=dict(do_sample=False, num_beams=5, repetition_penalty=1.5, length_penalty=0.6,
                 num_return_sequences=2, max_new_tokens=MAX_NEW_BEAM)),
]

# Logits-replay traces (hf-generation.md §6), base variant only.
TRACE_VARIANT = "base-default-f32"
TRACE_CASES = [
    dict(name="greedy_img1", prompt="img1", seed=None,
         kw=dict(do_sample=False, num_beams=1, max_new_tokens=8)),
    dict(name="beam3_img2_rep1.5_lp1.0", prompt="img2", seed=None,
         kw=dict(do_sample=False, num_beams=3, repetition_penalty=1.5, length_penalty=1.0,
                 num_return_sequences=2, max_new_tokens=8)),
    dict(name="sample_t0.7_topp0.9_rep1.5", prompt="img1", seed=1001,
         kw=dict(do_sample=True, num_beams=1, temperature=0.7, top_p=0.9, repetition_penalty=1.5,
                 max_new_tokens=8)),
    dict(name="sample_t1.3_topk0_minp0.05_ngram2", prompt="text", seed=1002,
         kw=dict(do_sample=True, num_beams=1, temperature=1.3, top_k=0, min_p=0.05, no_repeat_ngram_size=2,
                 max_new_tokens=8)),
    dict(name="beamsample5_img1_t0.7_rep1.5", prompt="img1", seed=1003,
         kw=dict(do_sample=True, num_beams=5, temperature=0.7, repetition_penalty=1.5,
                 num_return_sequences=2, max_new_tokens=6)),
]


# ----------------------------------------------------------------------------------------------
# Output helpers
# ----------------------------------------------------------------------------------------------
class Writer:
    """Collects files with descriptions; writes them deterministically."""

    def __init__(self, root: Path):
        self.root = root
        self.files = {}  # rel -> description dict

    def path(self, rel):
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def describe(self, rel, desc, **extra):
        d = {"description": desc}
        d.update(extra)
        self.files[rel] = d

    def json(self, rel, obj, desc):
        self.path(rel).write_bytes(json_bytes(obj))
        self.describe(rel, desc, format="json")

    def npy(self, rel, arr, desc):
        arr = canon_array(arr)
        buf = io.BytesIO()
        np.lib.format.write_array(buf, arr, version=(1, 0), allow_pickle=False)
        self.path(rel).write_bytes(buf.getvalue())
        self.describe(rel, desc, format="npy", dtype=arr.dtype.str, shape=list(arr.shape))

    def raw(self, rel, data: bytes, desc):
        self.path(rel).write_bytes(data)
        self.describe(rel, desc)


def json_bytes(obj):
    return (json.dumps(obj, ensure_ascii=False, sort_keys=True, indent=1, allow_nan=False) + "\n").encode("utf-8")


def canon_array(arr):
    if isinstance(arr, torch.Tensor):
        arr = arr.detach().cpu()
        if arr.dtype in (torch.bfloat16, torch.float16):
            arr = arr.float()
        arr = arr.numpy()
    arr = np.asarray(arr)
    if arr.dtype.kind == "f":
        arr = arr.astype("<f4")
    elif arr.dtype.kind in "iub":
        arr = arr.astype("<i4") if arr.size == 0 or (arr.min() >= -2**31 and arr.max() < 2**31) else arr.astype("<i8")
    else:
        raise TypeError(arr.dtype)
    return np.ascontiguousarray(arr)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fl(x):
    """float32 scalar -> Python float (exact)."""
    return float(np.float32(x))


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------
def train_spm(corpus_path: Path) -> bytes:
    spm.set_random_generator_seed(SPM_SEED)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(input=str(corpus_path), model_writer=buf, **SPM_TRAINER_ARGS)
    return buf.getvalue()


def build_hf_tokenizer(spm_path: Path, out_dir: Path):
    """HF-style conversion (transformers' convert_slow_tokenizer via LlamaTokenizerFast, legacy mode),
    then Asagi's additions: additional_special_tokens ['<image>', '<pad>'] at the end of the vocab."""
    tok = LlamaTokenizerFast(
        vocab_file=str(spm_path), legacy=True, add_prefix_space=True, add_bos_token=True, add_eos_token=False,
        from_slow=True, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<PAD|LLM-jp>",
        cls_token="<CLS|LLM-jp>", sep_token="<SEP|LLM-jp>", mask_token="<MASK|LLM-jp>",
        clean_up_tokenization_spaces=False,
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<pad>"]})
    with tempfile.TemporaryDirectory() as td:
        tok.save_pretrained(td, legacy_format=False)
        tj = json.loads(Path(td, "tokenizer.json").read_text(encoding="utf-8"))
        cfg = json.loads(Path(td, "tokenizer_config.json").read_text(encoding="utf-8"))
        stm = json.loads(Path(td, "special_tokens_map.json").read_text(encoding="utf-8"))
    # llm-jp / Asagi ship a plain PreTrainedTokenizerFast (BOS comes from tokenizer.json's post_processor).
    keep = ["added_tokens_decoder", "additional_special_tokens", "bos_token", "eos_token", "unk_token", "pad_token",
            "cls_token", "sep_token", "mask_token", "clean_up_tokenization_spaces", "model_max_length"]
    cfg = {k: cfg[k] for k in keep if k in cfg}
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True, add_eos_token=False,
               model_max_length=MAX_POS)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_bytes(
        (json.dumps(tj, ensure_ascii=False, indent=2, sort_keys=False) + "\n").encode("utf-8"))
    (out_dir / "tokenizer_config.json").write_bytes(json_bytes(cfg))
    (out_dir / "special_tokens_map.json").write_bytes(json_bytes(stm))


def build_llmjp_style_tokenizer(spm_path: Path, out_dir: Path):
    """The same .model converted the way llm-jp-tokenizer's own HF script does it (regex normalizer
    `(?<!\\n)^` -> '▁', Replace decoders), with a `<s> $A` post-processor and Asagi's added tokens.
    Speculative: llm-jp-3's real tokenizer.json was not available (asagi-model.md §10, §14)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, processors
    from transformers.convert_slow_tokenizer import import_protobuf

    pb2 = import_protobuf()  # the protobuf schema shipped by transformers

    proto = pb2.ModelProto()
    proto.ParseFromString(spm_path.read_bytes())
    vocab = [(p.piece, p.score) for p in proto.pieces]
    specials = [p.piece for p in proto.pieces if p.type in (2, 3, 4, 5)]
    t = Tokenizer(models.Unigram(vocab, proto.trainer_spec.unk_id, byte_fallback=True))
    t.add_special_tokens(specials)
    t.normalizer = normalizers.Sequence([
        normalizers.Replace(Regex("(?<!\\n)^"), "▁"),
        normalizers.Replace(Regex(" "), "▁"),
    ])
    t.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                     special_tokens=[("<s>", 1)])
    t.decoder = decoders.Sequence([
        decoders.ByteFallback(),
        decoders.Replace(Regex("▁"), " "),
        decoders.Fuse(),
        decoders.Replace(Regex("(?<!\\n)^ "), ""),
    ])
    from tokenizers import AddedToken
    t.add_special_tokens([AddedToken("<image>", normalized=False, special=True),
                          AddedToken("<pad>", normalized=False, special=True)])
    out_dir.mkdir(parents=True, exist_ok=True)
    tj = json.loads(t.to_str())
    (out_dir / "tokenizer.json").write_bytes(
        (json.dumps(tj, ensure_ascii=False, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def load_tokenizer(dir_):
    tok = AutoTokenizer.from_pretrained(str(dir_))
    return tok


def tokenizer_goldens(tok, sp_model_path=None):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model_path)) if sp_model_path else None
    out = []
    for name, text in TOKENIZER_CASES:
        ids = tok(text)["input_ids"]
        ids_ns = tok(text, add_special_tokens=False)["input_ids"]
        rec = {
            "name": name,
            "text": text,
            "ids": ids,
            "tokens": tok.convert_ids_to_tokens(ids),
            "ids_no_special": ids_ns,
            "decoded": tok.decode(ids, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
            "decoded_no_special_ids": tok.decode(ids_ns, skip_special_tokens=False),
        }
        if sp is not None:
            # sentencepiece's own encoder on the raw text (no added-token splitting): informational
            sp_ids = sp.encode(text)
            rec["spm_ids"] = sp_ids
            rec["spm_equal"] = sp_ids == ids_ns
        out.append(rec)
    return out


# ----------------------------------------------------------------------------------------------
# Images and preprocessing
# ----------------------------------------------------------------------------------------------
def make_images():
    """Deterministic test images -> {name: bytes}."""
    rng = np.random.default_rng(20240901)
    out = {}

    def png(img):
        b = io.BytesIO()
        img.save(b, format="PNG")
        return b.getvalue()

    # 80x60 RGB: gradient + shapes + noise
    w, h = 80, 60
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 255 / (w - 1), yy * 255 / (h - 1), (xx + yy) * 127 / (w + h)], -1)
    a = np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(a, "RGB")
    d = ImageDraw.Draw(img)
    d.rectangle([8, 6, 30, 28], fill=(230, 30, 40))
    d.ellipse([40, 20, 72, 52], fill=(20, 200, 60), outline=(0, 0, 0))
    d.line([0, 59, 79, 0], fill=(255, 255, 255), width=2)
    out["rgb_80x60.png"] = png(img)

    # 30x45 JPEG: checker + color blocks
    w, h = 30, 45
    yy, xx = np.mgrid[0:h, 0:w]
    chk = (((xx // 5) + (yy // 5)) % 2).astype(np.float64)
    a = np.stack([chk * 200 + 30, 255 - yy * 5, xx * 8], -1)
    a = np.clip(a + rng.normal(0, 6, a.shape), 0, 255).astype(np.uint8)
    b = io.BytesIO()
    Image.fromarray(a, "RGB").save(b, format="JPEG", quality=90, subsampling=2, optimize=False)
    out["rgb_30x45.jpg"] = b.getvalue()

    # 70x50 grayscale
    w, h = 70, 50
    yy, xx = np.mgrid[0:h, 0:w]
    a = 128 + 100 * np.sin(xx / 5.0) * np.cos(yy / 7.0) + rng.normal(0, 8, (h, w))
    out["gray_70x50.png"] = png(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L"))

    # 64x48 RGBA with transparent stripes and nonzero RGB beneath
    w, h = 64, 48
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([(xx * 4) % 256, (yy * 5) % 256, ((xx * yy) // 3) % 256], -1).astype(np.float64)
    rgb = np.clip(rgb + rng.normal(0, 5, rgb.shape), 1, 255)
    alpha = np.where(xx < 20, 0, np.where(xx < 40, 96, 255))
    a = np.concatenate([rgb, alpha[..., None]], -1).astype(np.uint8)
    out["rgba_64x48.png"] = png(Image.fromarray(a, "RGBA"))

    # 50x40 palette image
    w, h = 50, 40
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([(xx * 5) % 256, (yy * 6) % 256, ((xx + yy) * 3) % 256], -1).astype(np.uint8)
    pimg = Image.fromarray(a, "RGB").quantize(colors=16, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out["palette_50x40.png"] = png(pimg)

    # 56x56 RGB exact size
    a = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
    a[:28, :28] = (250, 250, 20)
    out["rgb_56x56.png"] = png(Image.fromarray(a, "RGB"))

    # 200x120 RGB: fine detail, strong downscale
    w, h = 200, 120
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([((xx // 2 + yy // 2) % 2) * 255, (xx * 255) // (w - 1), (yy * 255) // (h - 1)], -1)
    a = np.clip(a + rng.normal(0, 4, a.shape), 0, 255).astype(np.uint8)
    out["rgb_200x120.png"] = png(Image.fromarray(a, "RGB"))
    out.update(make_jpeg_images())
    assert set(out) == set(IMAGES)
    return out


def photo_like(w, h, seed, noise=3.0):
    """Deterministic photo-like RGB uint8 [h,w,3]: smooth vertical gradient with a wavy horizon, soft colour blobs,
    hard-edged saturated shapes (some next to black/white, so chroma and clipping matter) and mild noise."""
    prng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    x = xx / max(w - 1, 1)
    y = yy / max(h - 1, 1)
    t = np.clip(y + 0.06 * np.sin(2 * np.pi * (1.3 * x + prng.uniform())), 0, 1)[..., None]
    top = np.array([90.0, 150.0, 230.0])
    bottom = np.array([70.0, 130.0, 60.0])
    a = top * (1 - t) + bottom * t
    for _ in range(4):
        cx, cy = prng.uniform(0, 1, 2)
        s = prng.uniform(0.1, 0.3)
        col = prng.uniform(-70, 70, 3)
        a = a + col * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))[..., None]
    img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)

    def pt(px, py):
        return (int(round(px * (w - 1))), int(round(py * (h - 1))))

    lw = max(1, min(w, h) // 30)
    d.rectangle([pt(0.05, 0.08), pt(0.30, 0.40)], fill=(245, 245, 240))  # white card with a red disk on it
    d.ellipse([pt(0.10, 0.13), pt(0.25, 0.35)], fill=(225, 25, 30), outline=(0, 0, 0), width=lw)
    d.polygon([pt(0.55, 0.15), pt(0.90, 0.30), pt(0.62, 0.55)], fill=(250, 215, 20))
    d.rectangle([pt(0.40, 0.62), pt(0.75, 0.92)], fill=(20, 40, 200), outline=(250, 250, 250), width=lw)
    d.ellipse([pt(0.78, 0.60), pt(0.97, 0.85)], fill=(200, 30, 200))
    d.line([pt(0.0, 0.97), pt(1.0, 0.45)], fill=(10, 10, 10), width=lw)
    d.line([pt(0.02, 0.5), pt(0.35, 0.95)], fill=(30, 220, 240), width=max(1, lw // 2))
    a = np.asarray(img, dtype=np.float64) + prng.normal(0, noise, (h, w, 3))
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def jpeg_bytes(img, **kw):
    b = io.BytesIO()
    img.save(b, format="JPEG", **kw)
    return b.getvalue()


def jpeg_segments(data):
    """[(marker, offset of the marker's 0xFF, payload start, payload end)] up to and including the first SOS."""
    assert data[:2] == b"\xff\xd8"
    segs, i = [], 2
    while True:
        assert data[i] == 0xFF, i
        m = data[i + 1]
        n = (data[i + 2] << 8) | data[i + 3]
        segs.append((m, i, i + 4, i + 2 + n))
        if m == 0xDA:
            return segs
        i += 2 + n


def cmyk_to_ycck_planes(cmyk):
    """The planes to give Pillow's CMYK encoder so that a YCCK decoder (libjpeg: C = 255 - R(Y,Cb,Cr), K as
    stored; then Pillow's CMYK;I inversion) returns ~cmyk: Pillow stores 255 - X, so X = (255 - Y, 255 - Cb,
    255 - Cr, K) where (Y, Cb, Cr) = JFIF RGB->YCbCr of (C, M, Y)."""
    c = cmyk[..., :3].astype(np.float64)
    yv = 0.299 * c[..., 0] + 0.587 * c[..., 1] + 0.114 * c[..., 2]
    cb = -0.168735892 * c[..., 0] - 0.331264108 * c[..., 1] + 0.5 * c[..., 2] + 128
    cr = 0.5 * c[..., 0] - 0.418687589 * c[..., 1] - 0.081312411 * c[..., 2] + 128
    ycc = np.clip(np.rint(np.stack([yv, cb, cr], -1)), 0, 255).astype(np.uint8)
    return np.concatenate([255 - ycc, cmyk[..., 3:]], -1)


def pillow_cmyk_to_ycck(data):
    """Pillow CMYK JPEG bytes -> the same file marked as YCCK: Adobe APP14 transform 0 -> 2 and the baseline
    SOF0/SOS component ids 'C','M','Y','K' -> 1..4 (libjpeg's YCCK ids; the ids do not affect decoding)."""
    b = bytearray(data)
    segs = jpeg_segments(data)
    ids = {ord("C"): 1, ord("M"): 2, ord("Y"): 3, ord("K"): 4}
    done = set()
    for m, _, p, _ in segs:
        if m == 0xEE and b[p:p + 5] == b"Adobe":
            assert b[p + 11] == 0
            b[p + 11] = 2
            done.add("app14")
        elif m == 0xC0:
            assert b[p + 5] == 4
            for k in range(4):
                b[p + 6 + 3 * k] = ids[b[p + 6 + 3 * k]]
            done.add("sof")
        elif m == 0xDA:
            assert b[p] == 4
            for k in range(4):
                b[p + 1 + 2 * k] = ids[b[p + 1 + 2 * k]]
            done.add("sos")
    assert done == {"app14", "sof", "sos"}, done
    return bytes(b)


def naive_cmyk(rgb):
    """RGB uint8 -> a CMYK uint8 image with partial black generation (K = 0.6 * (255 - max))."""
    f = rgb.astype(np.float64)
    k = 0.6 * (255 - f.max(-1, keepdims=True))
    cmy = np.clip(255 - f - k, 0, 255)
    return np.clip(np.rint(np.concatenate([cmy, k], -1)), 0, 255).astype(np.uint8)


def make_jpeg_images():
    """The JPEG variants (see IMAGES), each from its own seed; Pillow's encoder (bundled libjpeg-turbo),
    optimize=False except where progressive forces optimized Huffman tables."""
    out = {}
    rgb = lambda w, h, seed, **kw: Image.fromarray(photo_like(w, h, seed, **kw), "RGB")  # noqa: E731
    out["jpeg_420_97x61.jpg"] = jpeg_bytes(rgb(97, 61, 101), quality=90, subsampling=2, optimize=False)
    out["jpeg_422_83x57.jpg"] = jpeg_bytes(rgb(83, 57, 102), quality=90, subsampling=1, optimize=False)
    out["jpeg_444_71x49.jpg"] = jpeg_bytes(rgb(71, 49, 103), quality=90, subsampling=0, optimize=False)
    out["jpeg_prog_99x67.jpg"] = jpeg_bytes(rgb(99, 67, 104), quality=90, subsampling=2, progressive=True)
    # grayscale: no subsampling argument (Pillow's subsampling=2 would set the single component to 2x2)
    out["jpeg_gray_65x43.jpg"] = jpeg_bytes(rgb(65, 43, 105).convert("L"), quality=90, optimize=False)
    out["jpeg_cmyk_59x41.jpg"] = jpeg_bytes(Image.fromarray(naive_cmyk(photo_like(59, 41, 106)), "CMYK"),
                                            quality=90, optimize=False)
    planes = cmyk_to_ycck_planes(naive_cmyk(photo_like(59, 41, 107)))
    out["jpeg_ycck_59x41.jpg"] = pillow_cmyk_to_ycck(
        jpeg_bytes(Image.fromarray(planes, "CMYK"), quality=90, optimize=False))
    exif = Image.Exif()
    exif[0x0112] = 6
    out["jpeg_exif6_61x83.jpg"] = jpeg_bytes(rgb(61, 83, 108), quality=90, subsampling=2, optimize=False,
                                             exif=exif.tobytes())
    out["jpeg_restart_90x70.jpg"] = jpeg_bytes(rgb(90, 70, 109), quality=90, subsampling=2, optimize=False,
                                               restart_marker_blocks=4)
    out["jpeg_q30_113x77.jpg"] = jpeg_bytes(rgb(113, 77, 110), quality=30, subsampling=2, optimize=False)
    out["jpeg_420_640x480.jpg"] = jpeg_bytes(rgb(640, 480, 111, noise=2.0), quality=85, subsampling=2,
                                             optimize=False)
    return out


def image_processor(size):
    return SiglipImageProcessor(
        do_resize=True, size={"height": size, "width": size}, resample=3, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )


def open_image(images_dir, name):
    img = Image.open(Path(images_dir) / name)
    img.load()
    return img


def to_rgb(img):
    """The reference's input rule (asagi-model.md §14): PIL convert('RGB'), alpha dropped without compositing."""
    return img if img.mode == "RGB" else img.convert("RGB")


def jpeg_info(img, data):
    """What a decoder has to honour in a JPEG fixture (informational; the pixels are in golden/images)."""
    info = {"frame": None, "components": None, "adobe_transform": None, "restart_interval": None,
            "exif_orientation": img.getexif().get(0x0112)}
    for m, _, p, e in jpeg_segments(data):
        if m in (0xC0, 0xC1, 0xC2):
            info["frame"] = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive"}[m]
            info["components"] = [[data[p + 6 + 3 * k], data[p + 7 + 3 * k] >> 4, data[p + 7 + 3 * k] & 15]
                                  for k in range(data[p + 5])]
        elif m == 0xEE and data[p:p + 5] == b"Adobe":
            info["adobe_transform"] = data[p + 11]
        elif m == 0xDD:
            info["restart_interval"] = (data[p] << 8) | data[p + 1]
    if img.mode == "CMYK":
        # the CMYK values as Pillow holds them (after libjpeg's YCCK->CMYK, if any, and Pillow's CMYK;I inversion)
        info["cmyk_first_pixels"] = [list(img.getpixel((0, 0))), list(img.getpixel((1, 0)))]
    return info


def preprocess_goldens(images_dir, sizes):
    """-> (json record, {relpath: (array, description)})."""
    arrays = {}
    rec = {"images": {}, "sizes": {}}
    for name in sorted(IMAGES):
        img = open_image(images_dir, name)
        rgb = to_rgb(img)
        arrays[f"golden/images/{name}.rgb.npy"] = (
            np.asarray(rgb, dtype=np.uint8),
            f"decoded {name} after PIL convert('RGB'), [H,W,3] uint8 values stored as int32")
        rec["images"][name] = {"mode": img.mode, "width": img.width, "height": img.height,
                               "description": IMAGES[name]}
        if img.format == "JPEG":
            rec["images"][name]["jpeg"] = jpeg_info(img, (Path(images_dir) / name).read_bytes())
    for size in sizes:
        proc = image_processor(size)
        srec = {}
        for name in sorted(IMAGES):
            img = open_image(images_dir, name)
            stock = "ok"
            stock_pv = None
            try:
                stock_pv = proc(images=img, return_tensors="np")["pixel_values"][0]
            except Exception as e:  # noqa: BLE001 (we record what stock does)
                stock = f"{type(e).__name__}: {e}"
            rgb = to_rgb(img)
            pv = proc(images=rgb, return_tensors="np")["pixel_values"][0]
            assert pv.dtype == np.float32 and pv.shape == (3, size, size)
            resized = np.asarray(rgb.resize((size, size), resample=Image.BICUBIC), dtype=np.uint8)
            # HF: f32(u8 * (1/255) in f64), then (x - 0.5) / 0.5 in f32
            manual = ((resized.astype(np.float64) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
            assert np.array_equal(manual.transpose(2, 0, 1), pv), name
            if stock_pv is not None and img.mode != "RGB":
                stock += " (same as reference)" if np.array_equal(stock_pv, pv) else " (DIFFERS from reference)"
            srec[name] = {"stock_4.45.1": stock, "converted_to_rgb": img.mode != "RGB"}
            arrays[f"golden/preprocess/s{size}/{name}.pixel_values.npy"] = (
                pv, f"SiglipImageProcessor pixel_values for {name} at {size}x{size}: [3,{size},{size}] float32")
        rec["sizes"][str(size)] = srec
    return rec, arrays


# ----------------------------------------------------------------------------------------------
# Model building
# ----------------------------------------------------------------------------------------------
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def variant_config(spec, n_tok, image_token_id, pad_id):
    vocab = n_tok if spec["vocab_pad_to"] is None else -(-n_tok // spec["vocab_pad_to"]) * spec["vocab_pad_to"]
    text = LlamaConfig(
        vocab_size=vocab, hidden_size=TEXT_HIDDEN, intermediate_size=TEXT_FFN, num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS, num_key_value_heads=spec["kv_heads"], hidden_act="silu",
        max_position_embeddings=MAX_POS, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=None, torch_dtype=spec["dtype"],
    )
    vision = SiglipVisionConfig(
        hidden_size=VISION_HIDDEN, intermediate_size=VISION_FFN, num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS, num_channels=3, image_size=spec["image_size"], patch_size=PATCH,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0,
    )
    cfg = LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), ignore_index=-100,
        image_token_index=image_token_id, projector_hidden_act="gelu",
        vision_feature_select_strategy=spec["strategy"], vision_feature_layer=-2,
        pad_token_id=pad_id, tie_word_embeddings=False,
        projector_hidden_size=TEXT_HIDDEN * spec["projector_mult"],
    )
    cfg.torch_dtype = spec["dtype"]
    return cfg


INIT = {
    # Text model (Llama). Every matrix is N(0, gain^2 / fan_in) ("LeCun" init, gain 1 = unit-variance outputs for
    # unit-variance inputs); RMSNorm weights 1 + N(0, norm_std^2).
    "embed": 1.0,  # std of embed_tokens entries: the residual stream starts at rms 1
    "qk": 1.0,  # q/k: attention scores q.k/sqrt(64) have std ~1 (soft, not one-hot attention)
    "v": 1.0,
    "o": 1.0,
    "mlp": 1.0,  # gate/up
    "down": 0.6,  # residual-branch output of the MLP scaled down (GPT-2 style): the stream grows 1 -> ~1.2 rms
    "norm_std": 0.1,
    # Output head (the only place with large scales): lm_head row j =
    #     exp(lm_head_row_logstd * z_j) * lm_head * g_j      (random part, g_j ~ N(0, I/hidden), z_j ~ N(0, 1))
    #   + successor * e_t / |e_t|   if j = succ(t)          (successor part, see init_weights)
    "lm_head": 2.0,  # row norm (std * sqrt(hidden)) of the random part before the lognormal factor
    "lm_head_row_logstd": 0.4,  # lognormal spread of the random part's row norms ("Zipf-like")
    "successor": 3.0,  # norm of the successor component
    # Vision tower (SigLIP) and projector: the same LeCun rule; LayerNorm weights 1 + N(0, 0.1^2), LayerNorm biases
    # N(0, 0.1^2)
    "v_patch": 1.0,  # patch conv (fan_in 3*14*14)
    "v_pos": 0.5,  # std of the position embeddings (patch embeddings have rms ~0.5)
    "v_qk": 1.0,
    "v_v": 1.0,
    "v_o": 1.0,
    "v_fc1": 1.0,
    "v_fc2": 1.0,
    "v_ln_std": 0.1,
    "projector": 1.0,  # linear_1 and linear_2: the image embeddings come out at rms ~1, like token embeddings
    "bias": 0.05,  # every other bias (vision q/k/v/out, fc1/fc2, projector)
}


def init_std(name, shape):
    """Per-tensor init rule -> (kind, scale). Chosen so activations stay O(1) through every layer (the body is
    well-conditioned: quantisation noise is not amplified), the context and the images matter, and all the
    peakedness of the next-token distributions comes from lm_head (see init_weights)."""
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else None
    vision = name.startswith("vision_tower.")
    if name.endswith("embed_tokens.weight"):
        return "normal", INIT["embed"]
    if name.endswith("lm_head.weight"):
        return "normal", INIT["lm_head"] / math.sqrt(shape[1])
    if name.endswith("position_embedding.weight"):
        return "normal", INIT["v_pos"]
    if name.endswith("norm.weight") or "layernorm.weight" in name or ("layer_norm" in name and name.endswith("weight")):
        return "one_plus", INIT["v_ln_std"] if vision else INIT["norm_std"]
    if name.endswith("layernorm.bias") or ("layer_norm" in name and name.endswith("bias")):
        return "normal", INIT["v_ln_std"]
    if name.endswith(".bias"):
        return "normal", INIT["bias"]
    if len(shape) >= 2:
        gain = 1.0
        if "multi_modal_projector" in name:
            gain = INIT["projector"]
        elif "patch_embedding" in name:
            gain = INIT["v_patch"]
        elif any(k in name for k in ("q_proj", "k_proj")):
            gain = INIT["v_qk"] if vision else INIT["qk"]
        elif "v_proj" in name:
            gain = INIT["v_v"] if vision else INIT["v"]
        elif "o_proj" in name:
            gain = INIT["o"]
        elif "down_proj" in name:
            gain = INIT["down"]
        elif "out_proj" in name:
            gain = INIT["v_o"]
        elif "fc1" in name:
            gain = INIT["v_fc1"]
        elif "fc2" in name:
            gain = INIT["v_fc2"]
        elif any(k in name for k in ("gate_proj", "up_proj")):
            gain = INIT["mlp"]
        return "normal", gain / math.sqrt(fan_in)
    return "normal", 0.1


def successor_token_sets(tok):
    """Token sets of the successor map (init_weights): predictors = the ordinary SentencePiece pieces (not control
    0..7, not byte-fallback <0x00>..<0xFF>, which include the newline <0x0A>, not the added <image>/<pad>);
    targets = ordinary pieces, byte-fallback pieces and </s>; sentence_end = the piece '。' (its successor is </s>)."""
    special = set(tok.all_special_ids)
    byte = {i for i in range(len(tok)) if re.fullmatch(r"<0x[0-9A-F]{2}>", tok.convert_ids_to_tokens(i))}
    predictors = [i for i in range(len(tok)) if i not in special and i not in byte and i >= 8]
    return {"predictors": predictors, "targets": sorted(set(predictors) | byte | {tok.eos_token_id}),
            "sentence_end": tok.convert_tokens_to_ids("。"), "eos": tok.eos_token_id}


def init_weights(model, seed, n_tok, garbage_unused, succ_sets):
    sd = model.state_dict()
    new = {}
    for name in sorted(sd):
        t = sd[name]
        g = torch.Generator().manual_seed((seed * 1000003 + zlib.crc32(name.encode())) % (2**63))
        kind, s = init_std(name, tuple(t.shape))
        x = torch.randn(tuple(t.shape), generator=g, dtype=torch.float32) * s
        if kind == "one_plus":
            x = x + 1.0
        new[name] = x
    emb, key = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"
    end, eos = succ_sets["sentence_end"], succ_sets["eos"]
    # Zipf-like token "frequencies": lognormal row norms for the random part of lm_head (heavy-tailed logits); the
    # sentence end '。' and </s> get the two largest factors (the most frequent pieces: they often win where the
    # context decides, so some generations end early).
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    rows = torch.exp(INIT["lm_head_row_logstd"] * torch.randn(new[key].shape[0], generator=g, dtype=torch.float32))
    for rank, tid in enumerate((end, eos)):
        big = int(torch.argsort(rows[:n_tok], descending=True)[rank])
        rows[tid], rows[big] = rows[big].clone(), rows[tid].clone()
    new[key] = new[key] * rows[:, None]
    # Successor structure (what makes the next-token distributions peaked without large body weights): a random
    # one-to-one map succ from the ordinary pieces to ordinary/byte-fallback pieces and </s>, with succ('。') =
    # </s>; lm_head row succ(t) gets `successor` * e_t / |e_t|. The final hidden state is dominated by the current
    # token's embedding (the residual stream), so after an ordinary piece t the model predicts succ(t) by a wide
    # margin (the margin grows with |h|; quantisation noise is a small random perturbation of h). After
    # byte-fallback pieces (incl. the newline <0x0A>), special tokens and image features nothing is preferred: the
    # random part, i.e. the context and the images, decides (e.g. the first answer token after the template's
    # final newline, or what follows a generated byte).
    predictors = succ_sets["predictors"]
    gs = torch.Generator().manual_seed(seed * 7919 + 29)
    targets = torch.tensor(succ_sets["targets"], dtype=torch.long)
    tg = targets[torch.randperm(len(targets), generator=gs)[:len(predictors)]]
    i_end = predictors.index(end)
    at_eos = (tg == eos).nonzero().flatten()
    if len(at_eos):  # keep the map one-to-one
        tg[at_eos[0]] = tg[i_end]
    tg[i_end] = eos
    e = new[emb][torch.tensor(predictors, dtype=torch.long)]
    new[key][tg] += INIT["successor"] * e / e.norm(dim=1, keepdim=True)
    # Padded vocab rows (ids >= len(tokenizer)) get the mean row, as HF's resize_token_embeddings would
    # roughly do; their logits then sit at the mean logit and never win.
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        w = new[key]
        if w.shape[0] > n_tok:
            w[n_tok:] = w[:n_tok].mean(0, keepdim=True)
    if garbage_unused:
        last = VISION_LAYERS - 1
        for name in new:
            if (f"vision_model.encoder.layers.{last}." in name or "vision_model.post_layernorm." in name
                    or "vision_model.head." in name):
                new[name] = torch.full_like(new[name], float("nan"))
    model.load_state_dict(new, strict=True)


def build_variant(name, spec, tok, seed, out_dir: Path, images_dir):
    n_tok = len(tok)
    cfg = variant_config(spec, n_tok, tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<pad>"))
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    init_weights(model, seed, n_tok, spec["garbage_unused"], successor_token_sets(tok))
    model = model.to(TORCH_DTYPES[spec["dtype"]])
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    # Asagi's config.json comes from an older LlavaConfig without image_seq_length; HF falls back to 576
    cj = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    cj.pop("image_seq_length", None)
    (out_dir / "config.json").write_text(json.dumps(cj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out_dir


def load_model(model_dir, dtype=torch.float32):
    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), torch_dtype=dtype).eval()
    return model


# ----------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------
def build_inputs(tok, image_proc, images_dir, prompt_name, pv_dtype):
    p = PROMPTS[prompt_name]
    enc = tok(p["text"], return_tensors="pt")
    inp = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if p["images"]:
        pvs = [image_proc(images=to_rgb(open_image(images_dir, n)), return_tensors="pt")["pixel_values"]
               for n in p["images"]]
        inp["pixel_values"] = torch.cat(pvs, 0).to(pv_dtype)
    return inp


def n_image_tokens(cfg):
    n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    return n - 1 if cfg.vision_feature_select_strategy == "default" else n


def patch_pixel_expansion(model):
    """Intended semantics for beam search with several images: every beam sees all the prompt's images in
    order.  Stock 4.45.1 repeat_interleaves pixel_values like any [batch, ...] tensor, so a 2-image prompt
    with K beams gets [i1]*K + [i2]*K, which the legacy merge splits as (i1,i1), (i1,i2), ... per beam."""
    orig = model._expand_inputs_for_generation

    def expand(expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        pv = model_kwargs.pop("pixel_values", None)
        input_ids, model_kwargs = orig(expand_size=expand_size, is_encoder_decoder=is_encoder_decoder,
                                       input_ids=input_ids, **model_kwargs)
        if pv is not None:
            assert input_ids.shape[0] == expand_size, "patched expansion supports batch size 1 only"
            model_kwargs["pixel_values"] = pv.repeat(expand_size, 1, 1, 1)
        return input_ids, model_kwargs

    model._expand_inputs_for_generation = expand
    return orig


class Recorder:
    """Records torch.topk over beam candidates and torch.multinomial draws during generate()."""

    def __init__(self, cand_width=None):
        self.cand_width = cand_width
        self.topk = []
        self.draws = []

    def __enter__(self):
        self._topk, self._mult = torch.topk, torch.multinomial
        rec = self

        def topk(input, k, *a, **kw):
            if rec.cand_width is not None and input.dim() == 2 and input.shape[-1] == rec.cand_width:
                vals = rec._topk(input, min(k + 1, input.shape[-1]), dim=-1, largest=True, sorted=True).values
                rec.topk.append(vals.detach().clone())
            return rec._topk(input, k, *a, **kw)

        def multinomial(input, num_samples, *a, **kw):
            r = rec._mult(input, num_samples, *a, **kw)
            rec.draws.append(r.detach().clone())
            return r

        torch.topk, torch.multinomial = topk, multinomial
        return self

    def __exit__(self, *exc):
        torch.topk, torch.multinomial = self._topk, self._mult


class StepInputs(transformers.LogitsProcessor):
    """A no-op user logits processor that records every row's full input_ids at every step."""

    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores):
        self.steps.append(input_ids.detach().clone())
        return scores


def run_generate(model, tok, inp, kw, patched=True, seed=None, record_steps=False):
    V = model.config.text_config.vocab_size
    K = kw.get("num_beams", 1)
    orig = patch_pixel_expansion(model) if patched else None
    steps = StepInputs()
    try:
        if seed is not None:
            torch.manual_seed(seed)
        with Recorder(cand_width=K * V if K > 1 else None) as rec, torch.no_grad():
            out = model.generate(**inp, **kw, return_dict_in_generate=True, output_scores=True, output_logits=True,
                                 logits_processor=transformers.LogitsProcessorList([steps]) if record_steps else None)
    finally:
        if orig is not None:
            model._expand_inputs_for_generation = orig
    return out, rec, steps


def greedy_margins(scores):
    """top1 - top2 of the processed scores at each step (batch row 0)."""
    m = []
    for s in scores:
        v = torch.topk(s[0].float(), 2).values
        m.append(fl((v[0] - v[1]).item()))
    return m


def beam_gaps(rec, n_keep):
    gaps = []
    for vals in rec.topk:
        v = vals[0, : n_keep + 1].double()
        gaps.append(float((v[:-1] - v[1:]).min().item()))
    return gaps


def generation_record(tok, out, rec, kw, prompt_len):
    K = kw.get("num_beams", 1)
    seqs = out.sequences.tolist()
    r = {
        "sequences": seqs,
        "new_tokens": [s[prompt_len:] for s in seqs],
        "text": [tok.decode(s[prompt_len:], skip_special_tokens=False) for s in seqs],
        "text_skip_special": [tok.decode(s[prompt_len:], skip_special_tokens=True) for s in seqs],
        "steps": len(out.scores),
    }
    if K == 1 and not kw.get("do_sample"):
        r["margins"] = greedy_margins(out.scores)
        r["min_margin"] = min(r["margins"])
    if K > 1:
        r["sequences_scores"] = [fl(x) for x in out.sequences_scores.tolist()]
        r["beam_indices"] = out.beam_indices.tolist()
        if not kw.get("do_sample"):
            eos = 1
            gaps = beam_gaps(rec, max(2, 1 + eos) * K)
            r["candidate_gaps"] = gaps
            r["min_candidate_gap"] = min(gaps)
    return r


def check_margins(gen, std, prompt_margins, partial=False):
    """Failures of the seed criteria: margins below the thresholds (relative to the logit std `std`; prompt_margins:
    {prompt: min over positions of top-1 - top-2 of the logits}) and missing coverage (see below). partial: gen
    holds only the greedy cases."""
    bad = []
    for name in PROMPT_MARGIN_PROMPTS:
        if prompt_margins[name] < PROMPT_MARGIN_MIN * std:
            bad.append((name, "prompt", prompt_margins[name]))
    if not gen:
        return bad
    # coverage: the images and the question change the greedy continuation; some greedy run stops at </s>, but
    # not too early (MIN_GREEDY_STEPS); some beam search returns a hypothesis that finished early
    for group in DISTINCT_GREEDY:
        seqs = {tuple(gen[c]["new_tokens"][0]) for c in group}
        if len(seqs) < len(group):
            bad.append(("/".join(group), "not distinct", len(seqs)))
    eos = lambda r: any(EOS_ID in row for row in r["new_tokens"])
    for c, r in gen.items():
        if "margins" in r and r["steps"] < MIN_GREEDY_STEPS.get(c, MIN_GREEDY_STEPS["*"]):
            bad.append((c, "too short", r["steps"]))
    if not any(eos(r) for r in gen.values() if "margins" in r):
        bad.append(("greedy", "no </s>", 0))
    if not partial and not any(eos(r) for r in gen.values() if "sequences_scores" in r):
        bad.append(("beam", "no </s>", 0))
    for name, r in gen.items():
        if "min_margin" in r and r["min_margin"] < GREEDY_MARGIN_MIN.get(name, GREEDY_MARGIN_MIN["*"]) * std:
            bad.append((name, "greedy", r["min_margin"]))
        if "min_candidate_gap" in r and r["min_candidate_gap"] < BEAM_GAP_MIN * std:
            bad.append((name, "beam", r["min_candidate_gap"]))
    return bad


def run_gen_cases(model, tok, image_proc, images_dir, cases=None):
    gen = {}
    for case in GEN_CASES if cases is None else cases:
        inp = build_inputs(tok, image_proc, images_dir, case["prompt"], torch.float32)
        P = inp["input_ids"].shape[1]
        out, rec, _ = run_generate(model, tok, inp, case["kw"])
        r = generation_record(tok, out, rec, case["kw"], P)
        r.update(prompt=case["prompt"], params=case["kw"], prompt_ids=inp["input_ids"][0].tolist(),
                 images=PROMPTS[case["prompt"]]["images"])
        n_img = len(PROMPTS[case["prompt"]]["images"])
        if case["kw"].get("num_beams", 1) > 1 and n_img > 1:
            so, srec, _ = run_generate(model, tok, inp, case["kw"], patched=False)
            st = generation_record(tok, so, srec, case["kw"], P)
            r["stock_4.45.1"] = {
                "note": "stock generate() repeat_interleaves pixel_values per beam, so beams see the wrong images "
                        "(all beams descend from beam 0, which got image 1 twice); the main record uses the "
                        "patched expansion (every beam sees [image1, image2])",
                "sequences": st["sequences"], "sequences_scores": st["sequences_scores"],
                "text": st["text"],
                "same_as_patched": st["sequences"] == r["sequences"],
            }
        gen[case["name"]] = r
    return gen


def prompt_min_margin(logits):
    """min over positions of top-1 - top-2 of [L, V] logits."""
    v = torch.topk(logits.float(), 2, dim=-1).values
    return fl((v[:, 0] - v[:, 1]).min().item())


def logit_std(model, tok, image_proc, images_dir):
    inp = build_inputs(tok, image_proc, images_dir, "img1", torch.float32)
    with torch.no_grad():
        lg = model(**inp).logits[0]
    return fl(lg.std(dim=-1).mean().item())


# ----------------------------------------------------------------------------------------------
# Goldens for one variant
# ----------------------------------------------------------------------------------------------
def variant_goldens(vname, model_dir, images_dir, tok, traces=False):
    """-> (json dict, {relpath: (array, desc)}).  Everything is computed from the checkpoint in model_dir,
    loaded in float32 (bf16/f16 weights upcast exactly)."""
    model = load_model(model_dir, torch.float32)
    cfg = model.config
    spec = VARIANTS[vname]
    size = cfg.vision_config.image_size
    proc = SiglipImageProcessor.from_pretrained(str(model_dir))
    g = f"golden/{vname}"
    arrays = {}
    rec = {"variant": vname, "image_size": size, "n_image_tokens": n_image_tokens(cfg),
           "vocab_size": cfg.text_config.vocab_size, "len_tokenizer": len(tok),
           "image_token_id": cfg.image_token_index, "pad_token_id": cfg.pad_token_id}

    # vision features and projector output for every image
    N = n_image_tokens(cfg)
    for name in sorted(IMAGES):
        pv = proc(images=to_rgb(open_image(images_dir, name)), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            vo = model.vision_tower(pv, output_hidden_states=True)
            feat = vo.hidden_states[cfg.vision_feature_layer]
            if cfg.vision_feature_select_strategy == "default":
                feat = feat[:, 1:]
            proj = model.multi_modal_projector(feat)
        assert feat.shape[1] == N
        arrays[f"{g}/vision/{name}.features.npy"] = (
            feat[0], f"vision_tower hidden_states[-2] after select strategy '{cfg.vision_feature_select_strategy}' "
                     f"for {name}: [{N},{VISION_HIDDEN}] float32")
        arrays[f"{g}/vision/{name}.projected.npy"] = (
            proj[0], f"multi_modal_projector output for {name}: [{N},{TEXT_HIDDEN}] float32")
        if name == "rgb_80x60.png":
            arrays[f"{g}/vision/{name}.hidden_states.npy"] = (
                torch.stack(vo.hidden_states[:-1], 0)[:, 0],
                f"all vision hidden states up to the last used layer for {name} (index 0 = patch+position "
                f"embeddings, i = after encoder layer i-1; the last one is hidden_states[-2]), before the select "
                f"strategy: [{VISION_LAYERS},{(size // PATCH) ** 2},{VISION_HIDDEN}] float32")

    # full-sequence logits for each prompt
    rec["prompts"] = {}
    for pname, p in PROMPTS.items():
        inp = build_inputs(tok, proc, images_dir, pname, torch.float32)
        with torch.no_grad():
            out = model(**inp)
        ids = inp["input_ids"][0].tolist()
        L = len(ids) + len(p["images"]) * (N - 1)
        assert out.logits.shape[1] == L, (out.logits.shape, L)
        spans, pos, k = [], 0, 0
        for t in ids:
            if t == cfg.image_token_index:
                spans.append({"image": p["images"][k], "start": pos, "end": pos + N})
                pos += N
                k += 1
            else:
                pos += 1
        rec["prompts"][pname] = {"text": p["text"], "images": p["images"], "input_ids": ids,
                                 "expanded_length": L, "image_spans": spans, "description": p["description"],
                                 "last_logits_top5": torch.topk(out.logits[0, -1], 5).indices.tolist(),
                                 "min_top1_top2_margin": prompt_min_margin(out.logits[0])}
        arrays[f"{g}/logits/{pname}.npy"] = (
            out.logits[0], f"logits at every position of prompt '{pname}' ({p['description']}), images expanded in "
                           f"place (positions 0..L-1): [{L},{cfg.text_config.vocab_size}] float32")

    # generation goldens
    gen = run_gen_cases(model, tok, proc, images_dir)
    rec["generate"] = gen
    rec["logit_std"] = logit_std(model, tok, proc, images_dir)

    # stock bf16 path, for information (asagi-model.md §14)
    if spec["dtype"] == "bfloat16":
        sm = load_model(model_dir, torch.bfloat16)
        inp = build_inputs(tok, proc, images_dir, "img1", torch.bfloat16)
        with torch.no_grad():
            lg = sm(**inp).logits[0, -1].float()
        ref_last = torch.from_numpy(arrays[f"{g}/logits/img1.npy"][0][-1].numpy().copy())
        so, srec, _ = run_generate(sm, tok, inp, GEN_CASES[0]["kw"])
        sr = generation_record(tok, so, srec, GEN_CASES[0]["kw"], inp["input_ids"].shape[1])
        rec["stock_bf16"] = {
            "note": "stock path: from_pretrained(torch_dtype=bfloat16), bf16 pixel_values (as the model card); "
                    "computes in bf16 and rounds RoPE inv_freq; informational only, not a parity target",
            "img1_last_logits_max_abs_diff_vs_reference": fl((lg - ref_last).abs().max().item()),
            "greedy_img1_sequences": sr["sequences"],
            "greedy_img1_same_as_reference": sr["sequences"] == gen["greedy_img1"]["sequences"],
        }
        arrays[f"{g}/stock/img1_last_logits_bf16.npy"] = (
            lg, "INFORMATION ONLY: stock bf16 HF path, last-position logits of prompt img1: [V] float32")
        del sm

    if traces:
        rec["traces"] = {}
        for case in TRACE_CASES:
            inp = build_inputs(tok, proc, images_dir, case["prompt"], torch.float32)
            P = inp["input_ids"].shape[1]
            out, rrec, steps = run_generate(model, tok, inp, case["kw"], seed=case["seed"], record_steps=True)
            K = case["kw"].get("num_beams", 1)
            tdir = f"{g}/traces/{case['name']}"
            raw = torch.stack(out.logits, 0)  # [steps, rows, V]
            sc = torch.stack(out.scores, 0)
            arrays[f"{tdir}/raw_logits.npy"] = (
                raw, f"per step, raw last-position logits (float32) for each live row (beam) in HF's row order at "
                     f"that step: [steps,{K},V]")
            arrays[f"{tdir}/scores.npy"] = (
                sc, "per step, processed scores (after the full logits-processor list; beam modes: of "
                    "log_softmax(logits), before beam_scores are added); -inf where masked: [steps,rows,V]")
            tr = {"prompt": case["prompt"], "params": case["kw"], "seed": case["seed"],
                  "prompt_ids": inp["input_ids"][0].tolist(), "prompt_length": P, "images": PROMPTS[case["prompt"]]["images"],
                  "sequences": out.sequences.tolist(), "steps": len(out.scores),
                  "step_input_ids": [s.tolist() for s in steps.steps],
                  "text": [tok.decode(s[P:]) for s in out.sequences.tolist()]}
            if K > 1:
                tr["sequences_scores"] = [fl(x) for x in out.sequences_scores.tolist()]
                tr["beam_indices"] = out.beam_indices.tolist()
            if case["kw"].get("do_sample"):
                tr["multinomial_draws"] = [d.tolist() for d in rrec.draws]
            rec["traces"][case["name"]] = tr
    return rec, arrays


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def versions():
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "sentencepiece": spm.__version__,
        "pillow": PIL.__version__,
        "libjpeg_turbo": PIL.features.version("libjpeg_turbo"),
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
    }


def prompt_margins(rec):
    return {k: v["min_top1_top2_margin"] for k, v in rec["prompts"].items()}


def seed_search_summary(log):
    """Compact record of a seed search: first seed tried, number of rejected seeds, and how many were rejected by
    each criterion (a seed counts once per criterion: prompt, greedy, beam, not distinct, too short, no </s>)."""
    if log is None:
        return None
    by = {}
    for e in log[:-1]:
        for kind in sorted({f[1] for f in e["failures"]}):
            by[kind] = by.get(kind, 0) + 1
    return {"first_seed": log[0]["seed"], "rejected": len(log) - 1, "rejected_by": by}


def search_seed(vname, spec, tok, images_dir, base_seed, tries=5000):
    """First seed from base_seed whose prompt margins, greedy margins and beam candidate gaps all pass."""
    log = []
    with tempfile.TemporaryDirectory() as td:
        for seed in range(base_seed, base_seed + tries):
            d = Path(td) / f"s{seed}"
            build_variant(vname, spec, tok, seed, d, images_dir)
            model = load_model(d)
            proc = image_processor(spec["image_size"])
            std = logit_std(model, tok, proc, images_dir)
            pm = {}
            for pname in PROMPT_MARGIN_PROMPTS:
                with torch.no_grad():
                    pm[pname] = prompt_min_margin(model(**build_inputs(tok, proc, images_dir, pname, torch.float32)).logits[0])
            # cheap checks first: prompt margins, then the greedy cases, then the beam cases
            bad = check_margins({}, std, pm)
            if not bad:
                greedy = [c for c in GEN_CASES if c["kw"]["num_beams"] == 1]
                gen = run_gen_cases(model, tok, proc, images_dir, greedy)
                bad = check_margins(gen, std, pm, partial=True)
            if not bad:
                gen.update(run_gen_cases(model, tok, proc, images_dir, [c for c in GEN_CASES if c not in greedy]))
                bad = check_margins(gen, std, pm)
            log.append({"seed": seed, "failures": [[a, b, c] for a, b, c in bad]})
            print(f"  {vname} seed {seed}: {'ok' if not bad else bad}", flush=True)
            shutil.rmtree(d)
            if not bad:
                return seed, log
    raise RuntimeError(f"no seed passes the margins for {vname}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seeds", type=Path, default=None,
                    help="JSON {variant: seed} to skip the seed search (as recorded in manifest.json)")
    args = ap.parse_args(argv)
    for k, v in EXPECTED_VERSIONS.items():
        got = versions()[k].split("+")[0]
        if got != v:
            print(f"WARNING: {k} {got} != pinned {v}", file=sys.stderr)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("tokenizer", "images", "models", "golden", "manifest.json"):
        p = out / sub
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    w = Writer(out)

    # 1. tokenizer
    print("tokenizer", flush=True)
    w.raw("tokenizer/spiece.model", train_spm(HERE / "corpus.txt"),
          "SentencePiece Unigram model trained on tests/reference/corpus.txt (byte_fallback, identity normalizer, "
          "add_dummy_prefix, split_digits, llm-jp special pieces at 3..7, byte pieces at 8..263)")
    build_hf_tokenizer(out / "tokenizer/spiece.model", out / "tokenizer")
    w.describe("tokenizer/tokenizer.json", "HF fast tokenizer (transformers' convert_slow_tokenizer, legacy mode: "
               "Prepend('▁') + Replace(' ', '▁') normalizer, no pre-tokenizer, BOS template) + '<image>', '<pad>'")
    w.describe("tokenizer/tokenizer_config.json", "tokenizer_config (PreTrainedTokenizerFast, add_bos_token true, "
               "add_eos_token false, added_tokens_decoder)")
    w.describe("tokenizer/special_tokens_map.json", "special_tokens_map")
    build_llmjp_style_tokenizer(out / "tokenizer/spiece.model", out / "tokenizer/llmjp-style")
    w.describe("tokenizer/llmjp-style/tokenizer.json",
               "the same model converted like llm-jp-tokenizer's own script (regex '(?<!\\n)^' normalizer, Replace "
               "decoders) + BOS template + '<image>', '<pad>'; speculative, not used by the models")
    tok = load_tokenizer(out / "tokenizer")
    assert type(tok).__name__ == "PreTrainedTokenizerFast", type(tok)
    tok_cases = tokenizer_goldens(tok, out / "tokenizer/spiece.model")
    w.json("golden/tokenizer_cases.json", tok_cases,
           "tokenizer(text) ids (with BOS), tokens, ids without specials, decode(ids) with and without "
           "skip_special_tokens; spm_ids = sentencepiece's own encode of the raw text (informational)")
    tok2 = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer/llmjp-style/tokenizer.json"),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)
    w.json("golden/tokenizer_cases_llmjp_style.json", tokenizer_goldens(tok2),
           "the same cases through tokenizer/llmjp-style/tokenizer.json")

    # 2. images and preprocessing
    print("images", flush=True)
    for name, data in make_images().items():
        w.raw(f"images/{name}", data, IMAGES[name])
    sizes = sorted({s["image_size"] for s in VARIANTS.values()})
    prec, parr = preprocess_goldens(out / "images", sizes)
    for rel, (a, d) in parr.items():
        w.npy(rel, a, d)
    w.json("golden/preprocess.json", prec,
           "per image: mode and size; per target size: what stock SiglipImageProcessor does with the original "
           "PIL image (ok or the exception), and whether the reference converted it to RGB first; for JPEGs the "
           "marker facts a decoder must honour (frame, components [id,h,v], Adobe transform, restart interval, "
           "EXIF orientation; CMYK values of the first two pixels as Pillow holds them)")

    # 3. models
    seeds = json.loads(args.seeds.read_text()) if args.seeds else {}
    manifest_variants = {}
    for i, (vname, spec) in enumerate(VARIANTS.items()):
        print(f"variant {vname}", flush=True)
        if vname in seeds:
            seed, log = seeds[vname], None
        else:
            seed, log = search_seed(vname, spec, tok, out / "images", base_seed=10000 * (i + 1))
        mdir = out / "models" / vname
        build_variant(vname, spec, tok, seed, mdir, out / "images")
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(out / "tokenizer" / f, mdir / f)
        image_processor(spec["image_size"]).save_pretrained(str(mdir))
        for f in sorted(mdir.iterdir()):
            w.describe(f"models/{vname}/{f.name}", {
                "config.json": "LlavaConfig (model_type llava; keys equal to HF defaults are omitted by save_pretrained)",
                "model.safetensors": f"weights ({spec['dtype']}), Asagi tensor names",
                "generation_config.json": "written by save_pretrained (GenerationConfig.from_model_config)",
                "preprocessor_config.json": "SiglipImageProcessor config",
            }.get(f.name, "copy of tokenizer/" + f.name))

        rec, arrs = variant_goldens(vname, mdir, out / "images", tok, traces=(vname == TRACE_VARIANT))
        for rel, (a, d) in arrs.items():
            w.npy(rel, a, d)
        w.json(f"golden/{vname}/goldens.json", rec,
               "prompts (ids, expanded length, image spans), generation results (sequences, texts, margins, beam "
               "scores; stock outputs where stock differs), traces metadata")
        bad = check_margins(rec["generate"], rec["logit_std"], prompt_margins(rec))
        assert not bad, (vname, bad)
        st = json.loads((mdir / "config.json").read_text())
        manifest_variants[vname] = {
            "seed": seed, "seed_search": seed_search_summary(log), "tests": spec["tests"], "dtype": spec["dtype"],
            "vision_feature_select_strategy": spec["strategy"],
            "dims": {
                "text_hidden": TEXT_HIDDEN, "text_layers": TEXT_LAYERS, "text_heads": TEXT_HEADS,
                "text_kv_heads": spec["kv_heads"], "head_dim": TEXT_HIDDEN // TEXT_HEADS, "ffn": TEXT_FFN,
                "vocab_size": st["text_config"]["vocab_size"], "len_tokenizer": len(tok),
                "max_position_embeddings": MAX_POS, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                "vision_hidden": VISION_HIDDEN, "vision_layers": VISION_LAYERS, "vision_layers_used": VISION_LAYERS - 1,
                "vision_heads": VISION_HEADS, "vision_ffn": VISION_FFN, "patch_size": PATCH,
                "image_size": spec["image_size"], "n_patches": (spec["image_size"] // PATCH) ** 2,
                "n_image_tokens": rec["n_image_tokens"],
                "projector_hidden": TEXT_HIDDEN * spec["projector_mult"],
            },
            "garbage_unused_vision_tensors": spec["garbage_unused"],
            "logit_std": rec["logit_std"],
            "min_greedy_margin": min(r["min_margin"] for r in rec["generate"].values() if "min_margin" in r),
            "min_beam_candidate_gap": min(r["min_candidate_gap"] for r in rec["generate"].values()
                                          if "min_candidate_gap" in r),
            "prompt_min_margin": prompt_margins(rec),
        }
        mv = manifest_variants[vname]
        mv["in_logit_std"] = {
            "min_greedy_margin": {c: fl(r["min_margin"] / rec["logit_std"]) for c, r in rec["generate"].items()
                                  if "min_margin" in r},
            "min_beam_candidate_gap": fl(mv["min_beam_candidate_gap"] / rec["logit_std"]),
            "prompt_min_margin": {k: fl(v / rec["logit_std"]) for k, v in mv["prompt_min_margin"].items()},
        }

    # 4. manifest
    files = {}
    for rel in sorted(w.files):
        d = dict(w.files[rel])
        d["sha256"] = sha256(out / rel)
        d["bytes"] = (out / rel).stat().st_size
        files[rel] = d
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert set(on_disk) == set(files), set(on_disk) ^ set(files)
    manifest = {
        "generator": "tests/reference/make_fixtures.py",
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
        "thresholds": {
            "unit": "the variant's logit std (variants.<v>.logit_std: mean over the positions of prompt img1 of the "
                    "std of the logits over the vocabulary)",
            "greedy_top1_top2_margin_min": GREEDY_MARGIN_MIN, "beam_candidate_gap_min": BEAM_GAP_MIN,
            "prompt_top1_top2_margin_min": PROMPT_MARGIN_MIN, "prompt_margin_prompts": list(PROMPT_MARGIN_PROMPTS),
            "coverage": {"distinct_greedy": [list(g) for g in DISTINCT_GREEDY], "min_greedy_steps": MIN_GREEDY_STEPS,
                         "some_greedy_ends_with_eos": True, "some_beam_hypothesis_ends_with_eos": True},
        },
        "init": INIT,
        "tokenizer": {"spm_trainer_args": {k: v for k, v in SPM_TRAINER_ARGS.items()}, "spm_seed": SPM_SEED,
                      "len": len(tok), "image_token_id": tok.convert_tokens_to_ids("<image>"),
                      "pad_token_id": tok.convert_tokens_to_ids("<pad>")},
        "prompts": {k: {"text": v["text"], "images": v["images"]} for k, v in PROMPTS.items()},
        "generation_cases": {c["name"]: {"prompt": c["prompt"], "params": c["kw"]} for c in GEN_CASES},
        "trace_cases": {c["name"]: {"prompt": c["prompt"], "params": c["kw"], "seed": c["seed"]} for c in TRACE_CASES},
        "variants": manifest_variants,
        "semantics": SEMANTICS,
        "files": files,
    }
    (out / "manifest.json").write_bytes(json_bytes(manifest))
    total = sum(f["bytes"] for f in files.values())
    print(f"wrote {len(files)} files, {total / 1e6:.2f} MB", flush=True)


SEMANTICS = {
    "reference_compute": "every golden is computed in float32 from the stored weights (f16/bf16 upcast exactly), "
                         "torch CPU, one thread, sdpa attention as from_pretrained picks it",
    "merge": "one <image> id per image in input_ids; LlavaForConditionalGeneration 4.45.1 takes its legacy path "
             "(#<image> < image_seq_length=576) = Asagi's _merge_input_ids_with_image_features: each <image> is "
             "replaced in place by that image's N features, images in order, positions 0..L-1, causal. "
             "check_fixtures.py verifies this against an independent numpy forward",
    "select_strategy": "'default' drops patch 0 (N = patches - 1), 'full' keeps all patches",
    "images": "reference input rule: PIL convert('RGB') for any non-RGB mode (alpha dropped, not composited); "
              "stock 4.45.1 raises for RGBA/L/P (see golden/preprocess.json)",
    "beam_multi_image": "patched: pixel_values repeated as a whole list per beam ([i1,i2]*K) instead of stock "
                        "repeat_interleave; stock output kept under 'stock_4.45.1'",
    "bf16": "bf16 variant: reference = bf16 weights upcast to float32, computed in float32 (RoPE inv_freq in f32); "
            "stock bf16 output kept under 'stock_bf16' for information",
    "generation_config": "bos 1, eos 2, pad = <pad> (from config.pad_token_id via from_model_config); HF stops on "
                         "eos only, and pads finished greedy rows / short beam hypotheses with pad",
    "padded_vocab": "bf16-padvocab: rows >= len(tokenizer) of embed_tokens and lm_head are the mean of the real "
                    "rows; their logits are recorded like any other",
    "weights": "well-conditioned random weights (LeCun init, unit-rms activations, soft attention); peaked "
               "next-token distributions come only from lm_head = lognormal-norm random rows + a one-to-one successor "
               "map (row succ(t) += 3 * e_t/|e_t|, t ordinary piece; succ('。') = </s>); '。' and </s> have the two "
               "largest random-row norms. After byte-fallback pieces (incl. newline), specials and image features "
               "the context decides. See tests/reference/README.md",
}

if __name__ == "__main__":
    main()
