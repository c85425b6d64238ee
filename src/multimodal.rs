//! Prompts with images: each `<image>` token of the prompt is replaced by its image's embeddings, images in
//! order, positions running on without gaps (Asagi's old-style LLaVA merge; ../shared/spec/asagi-model.md §8).

use anyhow::{bail, Result};

use crate::llm::{Input, Session};
use crate::vision::ImageEmbedding;

/// One piece of an expanded prompt.
pub enum Segment<'a> {
    Tokens(&'a [u32]),
    Image(&'a ImageEmbedding),
}

/// Splits `ids` at the `<image>` tokens and pairs each with the next image. Errors if the counts differ.
pub fn segments<'a>(
    ids: &'a [u32],
    image_token: Option<u32>,
    images: &'a [ImageEmbedding],
) -> Result<Vec<Segment<'a>>> {
    let n_marks = image_token.map_or(0, |t| ids.iter().filter(|&&x| x == t).count());
    if n_marks != images.len() {
        bail!("the prompt has {n_marks} <image> token(s) but {} image(s) were given", images.len());
    }
    let mut out = Vec::new();
    let mut rest = ids;
    let mut imgs = images.iter();
    while let Some(i) = image_token.and_then(|t| rest.iter().position(|&x| x == t)) {
        if i > 0 {
            out.push(Segment::Tokens(&rest[..i]));
        }
        out.push(Segment::Image(imgs.next().expect("counted above")));
        rest = &rest[i + 1..];
    }
    if !rest.is_empty() {
        out.push(Segment::Tokens(rest));
    }
    Ok(out)
}

/// Prefills sequence `seq` with the expanded prompt from position 0. Returns the logits (every position if
/// `all_logits`, else the last) and the number of positions used.
pub fn prefill(
    session: &mut Session<'_>,
    segs: &[Segment<'_>],
    seq: usize,
    all_logits: bool,
) -> Result<(Vec<f32>, i32)> {
    prefill_at(session, segs, seq, 0, all_logits)
}

/// As `prefill`, continuing sequence `seq` from position `pos0` (a follow-up turn of a conversation whose
/// earlier turns are still in the cache). Returns the logits and the position after the last one.
pub fn prefill_at(
    session: &mut Session<'_>,
    segs: &[Segment<'_>],
    seq: usize,
    pos0: i32,
    all_logits: bool,
) -> Result<(Vec<f32>, i32)> {
    let n_embd = session.model.hp.n_embd;
    let mut pos = pos0;
    let mut logits = Vec::new();
    for (k, s) in segs.iter().enumerate() {
        let last = k + 1 == segs.len();
        let (input, n) = match s {
            Segment::Tokens(t) => (Input::Tokens(t), t.len()),
            Segment::Image(img) => {
                if img.data.len() != img.n_tokens * n_embd {
                    bail!(
                        "image embeddings of width {} do not fit the language model's {n_embd}",
                        img.data.len() / img.n_tokens.max(1)
                    );
                }
                (Input::Embeddings(&img.data), img.n_tokens)
            }
        };
        let l = session.prefill(input, seq, pos, all_logits)?;
        if all_logits || last {
            logits.extend(l);
        }
        pos += n as i32;
    }
    Ok((logits, pos))
}
