//! Caches that spare recomputation across requests and processes:
//!
//! - [`image`]: image embeddings, in RAM (LRU within `--image-cache-ram`) and on disk (`--image-cache DIR`).
//! - prompt prefixes on disk: Asagi's prompt puts a fixed preamble and the images before the question, so the KV
//!   cells of [preamble + images] do not depend on the question. They are kept in the same folder ([`kv_file`],
//!   keyed by the exact items (tokens and image identities), the language model's and mmproj's identities and
//!   the KV cache type), and a new question about a cached image prefills only the question.
//! - saved sessions (`--session FILE`, [`kv_file`] too): a prompt and its answer's cells, restored as far as a
//!   later prompt starts with the same items.
//!
//! [`prompt`] puts them together for `run` and `encode`; `chat` uses the embeddings, sessions and a first turn's
//! prefix, `serve` the embeddings (its prompt prefixes stay in RAM, in its slots). Everything read back is checked whole; a bad or
//! foreign entry is recomputed, never trusted ([`store`], [`identity`]).

pub mod identity;
pub mod image;
pub mod items;
pub mod kv_file;
pub mod prompt;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;

use crate::llm::Session;
use crate::load::Loaded;
use image::ImageCache;
use items::Item;
use kv_file::Expect;
use store::{DiskStore, Kind};

/// Cache flags of `run`, `chat`, `encode` and `serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct CacheArgs {
    /// Folder that keeps image embeddings and the KV cells of image prompts' prefixes between runs (created if
    /// missing). Without it nothing is written to disk.
    #[arg(long, value_name = "DIR")]
    pub image_cache: Option<PathBuf>,
    /// Most megabytes the cache folder holds; least recently used entries are removed beyond it. A prefix entry of
    /// a 4B model's image prompt is ~270 MB (F16 cells), an image's embeddings 6-9 MB.
    #[arg(long, value_name = "MB", default_value_t = 4096)]
    pub image_cache_size: u64,
    /// Megabytes of image embeddings kept in RAM (least recently used out first).
    #[arg(long, value_name = "MB", default_value_t = 256)]
    pub image_cache_ram: u64,
    /// Keep only image embeddings in the cache folder, not the prompt prefixes' KV cells (`serve` keeps its
    /// prefixes in RAM only).
    #[arg(long)]
    pub no_prefix_cache: bool,
}

impl Default for CacheArgs {
    fn default() -> Self {
        CacheArgs { image_cache: None, image_cache_size: 4096, image_cache_ram: 256, no_prefix_cache: false }
    }
}

/// The caches of one loaded model.
pub struct Caches {
    /// Shared with `serve`'s HTTP side.
    pub images: Arc<ImageCache>,
    disk: Option<Arc<DiskStore>>,
    prefixes: bool,
    /// What KV files must match (this model, this cache type).
    pub expect: Expect,
}

impl Caches {
    /// Opens the caches for a loaded model and its session. The files' identities (which key everything on disk)
    /// are computed only when something is read from or written to disk: a cache folder, or a session file
    /// (`session_file`).
    pub fn for_loaded(
        args: &CacheArgs,
        loaded: &Loaded,
        session: &Session<'_>,
        n_image_tokens: usize,
        session_file: bool,
    ) -> Result<Caches> {
        let (llm, mmproj) = match args.image_cache.is_some() || session_file {
            true => loaded.identities()?,
            false => ([0; 32], None),
        };
        Caches::open(args, llm, mmproj, session, n_image_tokens)
    }

    /// Opens the caches for the language model and mmproj file of identities `llm`, `mmproj` and a session's
    /// cache.
    pub fn open(
        args: &CacheArgs,
        llm: [u8; 32],
        mmproj: Option<[u8; 32]>,
        session: &Session<'_>,
        n_image_tokens: usize,
    ) -> Result<Caches> {
        let mb = |x: u64| x.saturating_mul(1 << 20);
        let disk = match &args.image_cache {
            Some(dir) => Some(Arc::new(DiskStore::open(dir, mb(args.image_cache_size))?)),
            None => None,
        };
        let ram = usize::try_from(mb(args.image_cache_ram)).unwrap_or(usize::MAX);
        let images = Arc::new(ImageCache::new(mmproj.unwrap_or([0; 32]), ram, disk.clone()));
        let hp = &session.model.hp;
        let expect = Expect {
            llm,
            mmproj,
            cache_type: session.cache.ty().to_sys() as u32,
            n_layer: hp.n_layer,
            n_embd_kv: hp.n_embd_kv(),
            row_bytes: session.cache.row_bytes(),
            n_ctx: session.cache.n_cells(),
            n_vocab: hp.n_vocab,
            n_image_tokens,
        };
        Ok(Caches { images, prefixes: disk.is_some() && !args.no_prefix_cache, disk, expect })
    }

    /// The key of a prefix entry: these exact items for this model, mmproj and cache type.
    pub(crate) fn prefix_key(&self, items: &[Item]) -> [u8; 32] {
        let e = &self.expect;
        let mut h = blake3::Hasher::new_derive_key("asagi-gguf prompt prefix v1");
        h.update(&e.llm);
        h.update(&e.mmproj.unwrap_or([0; 32]));
        h.update(&e.cache_type.to_le_bytes());
        for it in items {
            match it {
                Item::Token(t) => h.update(&[0]).update(&t.to_le_bytes()),
                Item::Image(i) => h.update(&[1]).update(i),
            };
        }
        *h.finalize().as_bytes()
    }

    /// The prefix entry of `items`, if the cache holds a valid one. A bad entry is removed (with a warning naming
    /// it and the reason); one that cannot be opened (absent, or trimmed by another process a moment ago) is a miss.
    pub fn read_prefix(&self, items: &[Item]) -> Option<kv_file::KvFile> {
        let (disk, path) = self.prefix_path(items)?;
        match kv_file::KvFile::read(&path, &self.expect) {
            Ok(f) if f.items == items => {
                disk.touch(&path);
                Some(f)
            }
            Ok(_) => {
                eprintln!("warning: prefix cache: {}: other items under its key; removed", path.display());
                disk.remove(&path);
                None
            }
            Err(e) if e.downcast_ref::<std::io::Error>().is_some() => None,
            Err(e) => {
                eprintln!("warning: prefix cache: {}: {e:#}; computing the prefix again", path.display());
                disk.remove(&path);
                None
            }
        }
    }

    /// Where the prefix entry of `items` is, when prefixes are cached.
    pub(crate) fn prefix_path(&self, items: &[Item]) -> Option<(Arc<DiskStore>, PathBuf)> {
        let disk = self.disk.as_ref().filter(|_| self.prefixes)?;
        Some((disk.clone(), disk.path(Kind::Prefix, &self.prefix_key(items))))
    }

    pub fn disk(&self) -> Option<&Arc<DiskStore>> {
        self.disk.as_ref()
    }
}

/// Where the cacheable prefix of a prompt ends: after its last image (0 without images). What follows is the
/// question, which differs from prompt to prompt.
pub fn prefix_end(items: &[Item]) -> usize {
    items.iter().rposition(|i| matches!(i, Item::Image(_))).map_or(0, |i| i + 1)
}
