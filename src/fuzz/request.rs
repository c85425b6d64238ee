//! Target `request`: a chat completion request body (JSON, with its images as data URLs or ids) or an image upload
//! body (`POST /v1/images`), parsed and checked as `serve` does, then turned into the prompt and the decoder.
//! The first byte selects the kind (even: chat request, odd: upload), the rest is the body.
//!
//! Oracle: a request that passes validation respects every limit it was checked against.

use super::Fuzzer;
use crate::generate::Decoder;
use crate::preprocess::{self, ImageLimits, PreprocessConfig};
use crate::run_cmd::default_decoding;
use crate::serve::api::{self, ImageSource, Message, RequestLimits};

fn limits() -> RequestLimits {
    RequestLimits {
        max_text_bytes: 16 << 10,
        max_images: 4,
        max_image_bytes: 1 << 20,
        max_messages: 64,
        max_beams: 5,
        n_ctx: 256,
        allow_paths: false,
    }
}

impl Fuzzer {
    pub fn request(&self, data: &[u8]) -> bool {
        let Some((&kind, body)) = data.split_first() else { return false };
        let lim = limits();
        if kind & 1 == 1 {
            return api::parse_upload(body).is_ok_and(|url| api::image_source(&url, "url", &lim).is_ok());
        }
        let Ok(v) = api::parse(body, &default_decoding(), 64, &lim) else { return false };
        assert!(v.max_tokens >= 1 && v.max_tokens <= lim.n_ctx, "max_tokens {}", v.max_tokens);
        assert!(v.min_tokens <= v.max_tokens);
        assert!(v.n >= 1 && v.n <= v.beams() && v.beams() <= lim.max_beams, "n {} beams {}", v.n, v.beams());
        assert!(!v.stream || v.n == 1);
        let (mut text, mut images) = (0, Vec::new());
        for m in &v.messages {
            match m {
                Message::User { text: t, images: i } => {
                    text += t.len();
                    images.extend(i);
                }
                Message::Assistant { text: t } => text += t.len(),
            }
        }
        assert!(text <= lim.max_text_bytes && images.len() <= lim.max_images);

        let cfg = PreprocessConfig::siglip(28);
        let small = ImageLimits { max_pixels: 1 << 20, max_bytes: 32 << 20, max_resize_ops: 50_000_000 };
        let mut hashes = Vec::new();
        for im in images {
            match &im.source {
                ImageSource::Data(bytes) => {
                    assert!(bytes.len() <= lim.max_image_bytes, "{}: {} bytes", im.at, bytes.len());
                    match preprocess::preprocess_bytes_limited(bytes, &im.at, &cfg, &small) {
                        Ok((_, h)) => hashes.push(h),
                        Err(_) => return false,
                    }
                }
                ImageSource::Id(h) => hashes.push(*h),
                ImageSource::Path(p) => panic!("{}: a path ({p:?}) without --allow-paths", im.at),
            }
        }
        let tok = &self.reference().tok;
        let Ok(p) = crate::serve::prompt::build(tok, &v.messages, &hashes) else { return false };
        let mut g = v.decoding.config(v.max_tokens, &tok.eog);
        g.num_return_sequences = v.n;
        g.min_new_tokens = v.min_tokens;
        if g.do_sample && g.seed.is_none() {
            g.seed = Some(1);
        }
        Decoder::new(&g, &p.ids).is_ok()
    }
}
