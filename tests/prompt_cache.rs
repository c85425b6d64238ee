//! The caches give exactly what a fresh computation gives (F32 files and cache, CPU: bit for bit): a cached
//! image's embeddings, a cached prompt prefix (preamble + images) under a new question, a saved session resumed
//! with the same prompt or a longer one; a different image with the same question never reuses the other's cells;
//! a corrupt, truncated or foreign entry is refused with a reason and recomputed.

mod common;

use std::path::Path;

use asagi_convert::{LlmType, MmprojType};
use asagi_gguf::cache::identity::file_identity;
use asagi_gguf::cache::items::Item;
use asagi_gguf::cache::kv_file::KvFile;
use asagi_gguf::cache::prompt::{self as prompt_cache, Prefilled};
use asagi_gguf::cache::{CacheArgs, Caches};
use asagi_gguf::generate;
use asagi_gguf::llm::{LlamaModel, Session, SessionParams};
use asagi_gguf::preprocess::{DecodedImage, ImageLimits};
use asagi_gguf::run_cmd::asagi_prompt;
use asagi_gguf::tokenizer::Tokenizer;
use asagi_gguf::vision::{VisionEncoder, VisionModel};
use common::conversion::Converted;
use common::fixtures;
use ggml::{Backend, Type};

struct Env<'a> {
    files: &'a Converted,
    tok: Tokenizer,
    model: LlamaModel<'a>,
    vmodel: VisionModel<'a>,
    backend: Backend,
}

impl<'a> Env<'a> {
    fn new(files: &'a Converted) -> Env<'a> {
        Env {
            files,
            tok: Tokenizer::from_gguf(&files.llm).unwrap().0,
            model: LlamaModel::load(&files.llm).unwrap(),
            vmodel: VisionModel::load(&files.mmproj).unwrap(),
            backend: Backend::cpu(2).unwrap(),
        }
    }

    fn session(&self, cache_type: Type) -> Session<'_> {
        Session::new(
            &self.model,
            &[&self.backend],
            &SessionParams { n_ctx: 512, n_ubatch: 64, cache_type, ..Default::default() },
        )
        .unwrap()
    }

    /// Caches in `dir` (none on disk without it); embeddings only with `no_prefix`.
    fn caches(&self, s: &Session<'_>, dir: Option<&Path>, no_prefix: bool) -> Caches {
        let args =
            CacheArgs { image_cache: dir.map(Path::to_path_buf), no_prefix_cache: no_prefix, ..CacheArgs::default() };
        let (llm, mm) = (file_identity(&self.files.llm).unwrap(), file_identity(&self.files.mmproj).unwrap());
        Caches::open(&args, llm, Some(mm), s, self.vmodel.hp.n_image_tokens()).unwrap()
    }

    fn images(&self, names: &[&str]) -> Vec<DecodedImage> {
        let cfg = &self.vmodel.hp.preprocess;
        names
            .iter()
            .map(|n| {
                DecodedImage::open(&fixtures::root().join("images").join(n), cfg, &ImageLimits::default()).unwrap()
            })
            .collect()
    }

    /// The prompt of `question` about `images`, through `caches` (and `saved`).
    fn prefill(
        &self,
        s: &mut Session<'_>,
        caches: &mut Caches,
        question: &str,
        images: &[&str],
        saved: Option<&KvFile>,
    ) -> Prefilled {
        let ids = self.tok.encode(&asagi_prompt(question, images.len()), true).unwrap();
        self.prefill_ids(s, caches, &ids, images, saved)
    }

    /// As `prefill`, for token ids; the prefix entry written as `run` writes it after the answer.
    fn prefill_ids(
        &self,
        s: &mut Session<'_>,
        caches: &mut Caches,
        ids: &[u32],
        images: &[&str],
        saved: Option<&KvFile>,
    ) -> Prefilled {
        let imgs = self.images(images);
        let mut enc = VisionEncoder::new(&self.vmodel, &[&self.backend]).unwrap();
        let mut p = prompt_cache::prefill(s, caches, Some(&mut enc), ids, self.tok.image, &imgs, saved, false).unwrap();
        prompt_cache::save_prefix(s, caches, &mut p);
        p
    }

    /// The last position's logits of a computation without any cache, in a new session.
    fn fresh(&self, question: &str, images: &[&str]) -> Vec<f32> {
        let mut s = self.session(Type::F32);
        let mut none = self.caches(&s, None, false);
        let p = self.prefill(&mut s, &mut none, question, images, None);
        assert_eq!(p.report.restored_positions, 0);
        p.logits
    }
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

const Q1: &str = "この画像を説明してください。";
const Q2: &str = "何色ですか？";

#[test]
fn cached_images_and_prefixes_give_the_logits_of_a_fresh_computation() {
    let files = common::conversion::converted("base-default-f32", LlmType::F32, MmprojType::F32);
    let env = Env::new(&files);
    let dir = tempfile::tempdir().unwrap();
    for images in [&["rgb_80x60.png"][..], &["rgb_80x60.png", "photo_512x341.png"][..]] {
        let n = images.len();
        // Cold: everything computed, the images and the prefix written.
        let mut s = env.session(Type::F32);
        let mut caches = env.caches(&s, Some(dir.path()), false);
        let cold = env.prefill(&mut s, &mut caches, Q1, images, None);
        // (The second round's first image is the first round's: its embeddings come from the disk cache.)
        let r = &cold.report;
        assert_eq!((r.images_encoded, r.image_disk_hits, r.restored_positions), (1, n - 1, 0), "{images:?} cold");
        assert!(cold.report.prefix_saved, "{images:?}: prefix written");
        assert!(same_bits(&cold.logits, &env.fresh(Q1, images)), "{images:?}: cold run = fresh");

        // Another question, a new session (as a new process): the prefix restored, only the question computed.
        let mut s = env.session(Type::F32);
        let mut caches = env.caches(&s, Some(dir.path()), false);
        let warm = env.prefill(&mut s, &mut caches, Q2, images, None);
        let r = &warm.report;
        assert_eq!((r.restored_from, r.images_encoded, r.images), (Some("prefix cache"), 0, 0), "{images:?}");
        let n_question = warm.pos as usize - r.restored_positions;
        assert_eq!(r.prefill_positions, n_question, "only the question is computed");
        assert!(n_question < 20, "{n_question} positions after the prefix");
        assert!(same_bits(&warm.logits, &env.fresh(Q2, images)), "{images:?}: prefix cache = fresh");

        // Embeddings only (no prefix entries): the images come from disk, the prompt is computed.
        let mut s = env.session(Type::F32);
        let mut caches = env.caches(&s, Some(dir.path()), true);
        let emb = env.prefill(&mut s, &mut caches, Q2, images, None);
        let r = &emb.report;
        assert_eq!((r.restored_positions, r.images_encoded, r.image_disk_hits), (0, 0, n), "{images:?}");
        assert!(same_bits(&emb.logits, &env.fresh(Q2, images)), "{images:?}: cached embeddings = fresh");
    }

    // A prompt that ends with its image (a raw prompt): its prefix is the whole prompt, which is never restored
    // whole (the last position's logits are computed), the second time as the first.
    let ids = env.tok.encode(&asagi_prompt("", 1), true).unwrap();
    let end = ids.iter().position(|&t| Some(t) == env.tok.image).unwrap() + 1;
    for round in 0..2 {
        let mut s = env.session(Type::F32);
        let mut caches = env.caches(&s, Some(dir.path()), false);
        let p = env.prefill_ids(&mut s, &mut caches, &ids[..end], &["rgb_80x60.png"], None);
        assert_eq!(p.report.restored_from, None, "round {round}");
        assert_eq!(p.logits.len(), env.model.hp.n_vocab, "round {round}: the last position's logits");
    }

    // The same question about another image: its own prefix, not the first image's cells.
    let mut s = env.session(Type::F32);
    let mut caches = env.caches(&s, Some(dir.path()), false);
    let other = env.prefill(&mut s, &mut caches, Q1, &["gray_70x50.png"], None);
    assert_eq!((other.report.restored_from, other.report.images_encoded), (None, 1));
    assert!(same_bits(&other.logits, &env.fresh(Q1, &["gray_70x50.png"])));
    assert!(!same_bits(&other.logits, &env.fresh(Q1, &["rgb_80x60.png"])), "the images give different logits");
}

#[test]
fn a_saved_session_resumes_exactly() {
    let files = common::conversion::converted("base-default-f32", LlmType::F32, MmprojType::F32);
    let env = Env::new(&files);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.session");
    let images = ["rgb_80x60.png"];

    // First run: prompt, 12 greedy tokens, saved.
    let mut s = env.session(Type::F32);
    let caches = env.caches(&s, None, false);
    let mut none = env.caches(&s, None, false);
    let first = env.prefill(&mut s, &mut none, Q1, &images, None);
    let answer = generate::greedy(&mut s, first.logits.clone(), first.pos, 12, &[], |_| Ok(())).unwrap();
    assert_eq!(answer.len(), 12);
    let mut items = first.items.clone();
    items.extend(answer.iter().map(|&t| Item::Token(t)));
    prompt_cache::save_session(&path, &s, &caches, &items, first.items.len(), &first.logits).unwrap();

    // The same prompt: nothing computed, the same logits and tokens.
    let saved = KvFile::read(&path, &caches.expect).unwrap();
    let mut s = env.session(Type::F32);
    let again = env.prefill(&mut s, &mut none, Q1, &images, Some(&saved));
    assert_eq!((again.report.restored_from, again.report.prefill_positions), (Some("session"), 0));
    assert!(same_bits(&again.logits, &first.logits));
    let answer2 = generate::greedy(&mut s, again.logits.clone(), again.pos, 12, &[], |_| Ok(())).unwrap();
    assert_eq!(answer2, answer, "the answer again");

    // A longer prompt starting with the saved one: the saved cells kept, the rest computed; = fresh.
    let long_q = format!("{Q1}{}", env.tok.decode(&answer, true).unwrap());
    let mut s = env.session(Type::F32);
    let longer = env.prefill(&mut s, &mut none, &long_q, &images, Some(&saved));
    assert_eq!(longer.report.restored_from, Some("session"));
    assert!(longer.report.restored_positions > env.vmodel.hp.n_image_tokens(), "the image's cells reused");
    assert!(same_bits(&longer.logits, &env.fresh(&long_q, &images)), "resumed session = fresh");

    // Another image with the same question: nothing of the session is reused past the preamble.
    let ids = env.tok.encode(&asagi_prompt(Q1, 1), true).unwrap();
    let preamble = ids.iter().position(|&t| Some(t) == env.tok.image).unwrap();
    let mut s = env.session(Type::F32);
    let other = env.prefill(&mut s, &mut none, Q1, &["gray_70x50.png"], Some(&saved));
    assert_eq!(other.report.restored_positions, preamble, "only the preamble before the image is restored");
    assert!(same_bits(&other.logits, &env.fresh(Q1, &["gray_70x50.png"])));
}

#[test]
fn bad_entries_are_refused_with_a_reason_and_recomputed() {
    let files = common::conversion::converted("base-default-f32", LlmType::F32, MmprojType::F32);
    let env = Env::new(&files);
    let dir = tempfile::tempdir().unwrap();
    let images = ["rgb_80x60.png"];
    let mut s = env.session(Type::F32);
    let mut caches = env.caches(&s, Some(dir.path()), false);
    let cold = env.prefill(&mut s, &mut caches, Q1, &images, None);
    let entry = |sub: &str| {
        let d = dir.path().join(sub);
        let mut v: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(v.len(), 1, "{}: one entry: {v:?}", d.display());
        v.pop().unwrap()
    };
    let (kv, emb) = (entry("kv"), entry("img"));

    // A flipped byte in the prefix entry's rows, a truncated embedding entry: both recomputed, the logits right.
    let mut bytes = std::fs::read(&kv).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&kv, &bytes).unwrap();
    let len = std::fs::metadata(&emb).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&emb).unwrap().set_len(len - 1).unwrap();
    let expect = caches.expect.clone();
    let err = KvFile::read(&kv, &expect).err().unwrap().to_string();
    assert!(err.contains("checksum"), "{err}");
    let mut s = env.session(Type::F32);
    let mut caches = env.caches(&s, Some(dir.path()), false);
    let again = env.prefill(&mut s, &mut caches, Q1, &images, None);
    assert_eq!((again.report.restored_from, again.report.images_encoded), (None, 1), "both recomputed");
    assert_eq!(caches.images.counts().bad_entries, 1);
    assert!(same_bits(&again.logits, &cold.logits));
    assert_eq!(entry("kv"), kv, "the prefix was written again, under the same key");
    assert!(KvFile::read(&kv, &expect).is_ok());

    // A file made with another KV cache type, another model, or not a KV file at all: refused, named.
    let mut s16 = env.session(Type::F16);
    let mut c16 = env.caches(&s16, None, false);
    let p16 = env.prefill(&mut s16, &mut c16, Q1, &images, None);
    assert_eq!(p16.report.restored_from, None);
    let path = dir.path().join("f16.session");
    prompt_cache::save_session(&path, &s16, &c16, &p16.items, p16.items.len(), &p16.logits).unwrap();
    let err = KvFile::read(&path, &expect).err().unwrap().to_string();
    assert!(err.contains("cache type"), "{err}");
    let mut other_model = expect.clone();
    other_model.llm[0] ^= 1;
    let err = KvFile::read(&kv, &other_model).err().unwrap().to_string();
    assert!(err.contains("another language model"), "{err}");
    std::fs::write(&path, b"not a session").unwrap();
    let err = KvFile::read(&path, &expect).err().unwrap().to_string();
    assert!(err.contains("shorter than a header"), "{err}");
    let mut bytes = std::fs::read(&kv).unwrap();
    bytes.truncate(bytes.len() - 100);
    std::fs::write(&path, &bytes).unwrap();
    let err = KvFile::read(&path, &expect).err().unwrap().to_string();
    assert!(err.contains("truncated"), "{err}");
}
