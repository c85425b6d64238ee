//! `asagi-gguf encode`: fills the cache folder ahead of time, so that the first question about an image is as fast
//! as a later one. For each image: its embeddings, and the KV cells of Asagi's prompt up to and including the image
//! (the preamble does not depend on the question), keyed as `run` and `chat` look them up.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::json;

use crate::cache::identity::hex;
use crate::cache::prompt as prompt_cache;
use crate::cache::{prefix_end, CacheArgs, Caches};
use crate::load::{Loaded, ModelArgs};
use crate::preprocess::{DecodedImage, ImageLimits};
use crate::run_cmd::asagi_prompt;
use crate::vision::VisionEncoder;

#[derive(clap::Args, Debug)]
pub struct EncodeArgs {
    /// The language model and mmproj the cached cells are for (-m and --mmproj; the KV cache type matters too:
    /// use the --cache-type that `run` will use).
    #[command(flatten)]
    pub load: ModelArgs,
    /// Image files.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// One JSON object per image on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EncodeArgs) -> Result<()> {
    if args.cache.image_cache.is_none() {
        bail!("encode fills a cache folder: give --image-cache DIR");
    }
    let loaded = Loaded::open(&args.load, true)?;
    let tok = &loaded.tok;
    let model = loaded.model()?;
    let Some(vmodel) = loaded.vision(&model)? else { bail!("encode needs --mmproj") };
    let backends = loaded.backends();
    let mut session = loaded.session(&model, &backends)?;
    let mut encoder = VisionEncoder::new(&vmodel, &loaded.vision_backends())?;
    let caches = Caches::for_loaded(&args.cache, &loaded, &session, vmodel.hp.n_image_tokens(), false)?;
    // The template's tokens up to its image: the same for every question.
    let ids = tok.encode(&asagi_prompt("", 1), true)?;
    let end = prefix_end(&crate::cache::items::items_of(&ids, tok.image, &[[0; 32]]));
    let prefix = &ids[..end];
    let mut stdout = std::io::stdout().lock();
    for path in &args.images {
        let t = Instant::now();
        let img = DecodedImage::open(path, &vmodel.hp.preprocess, &ImageLimits::default())?;
        let items = crate::cache::items::items_of(prefix, tok.image, &[img.hash]);
        let n_embd = model.hp.n_embd;
        if !args.cache.no_prefix_cache && caches.read_prefix(&items).is_some() {
            let cached = caches.images.contains(&img.hash, vmodel.hp.n_image_tokens(), n_embd);
            let ms = t.elapsed().as_secs_f64() * 1e3;
            report(&mut stdout, args.json, path, &img.hash, ms, None, cached)?;
            continue;
        }
        let mut pre = prompt_cache::prefill(
            &mut session,
            &caches,
            Some(&mut encoder),
            prefix,
            tok.image,
            std::slice::from_ref(&img),
            None,
            true,
        )?;
        prompt_cache::save_prefix(&session, &caches, &mut pre);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        report(&mut stdout, args.json, path, &img.hash, ms, Some(&pre.report), true)?;
    }
    Ok(())
}

/// One image's line: what was done (`r`; `None`: the prefix was already cached, and the embeddings too if
/// `embeddings_cached`).
fn report(
    out: &mut impl Write,
    json: bool,
    path: &std::path::Path,
    hash: &[u8; 32],
    ms: f64,
    r: Option<&prompt_cache::Report>,
    embeddings_cached: bool,
) -> Result<()> {
    let id = hex(hash);
    if json {
        let cache = match r {
            Some(r) => r.to_json(),
            None => json!({"restored_from": "prefix cache", "images_encoded": 0, "prefix_saved": false,
                "embeddings_cached": embeddings_cached}),
        };
        writeln!(out, "{}", json!({"image": path.display().to_string(), "id": id, "ms": ms, "cache": cache}))?;
        return Ok(());
    }
    let what = match r {
        None => "already cached".to_string(),
        Some(r) => format!(
            "{}{}",
            if r.images_encoded == 0 { "embeddings from the cache" } else { "encoded" },
            if r.prefix_saved { ", prompt prefix cached" } else { "" }
        ),
    };
    writeln!(out, "{} {id}: {what} ({ms:.0} ms)", path.display())?;
    Ok(())
}
