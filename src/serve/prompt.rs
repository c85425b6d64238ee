//! A request's conversation as model input, and what of it the KV cache already holds. Chat clients send the
//! whole conversation with every request; the engine keeps earlier conversations' prompts and answers in its
//! slots and prefills only what differs after the longest common prefix (llama.cpp's server does the same), so
//! a follow-up about an image does not encode or prefill the image again.

use anyhow::Result;

use super::api::Message;
use crate::chat::turn_ids;
use crate::tokenizer::Tokenizer;

/// One cache entry of a prompt: a token, or a whole image, which takes `n_image_tokens` positions. An image is
/// known by the blake3 hash of its decoded pixels: the same picture sent as PNG or as another file is the same
/// image, and no crafted collision can make one client's image stand for another's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Item {
    Token(u32),
    Image([u8; 32]),
}

/// The request's prompt: HF `input_ids` (one `<image>` id per image; what the repetition penalty sees) and the
/// same as cache items.
pub struct Prompt {
    pub ids: Vec<u32>,
    pub items: Vec<Item>,
}

/// The conversation in Asagi's template: the first user message with BOS and the full template, each answer as
/// it continues the text, each later question in the follow-up template (as `chat` builds it). `hashes`: the
/// identity of each image of the conversation, in order.
pub fn build(tok: &Tokenizer, messages: &[Message], hashes: &[[u8; 32]]) -> Result<Prompt> {
    let mut ids = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        match m {
            Message::User { text, images } => ids.extend(turn_ids(tok, i == 0, text, images.len())?),
            Message::Assistant { text } => ids.extend(tok.encode_continuation(text)?),
        }
    }
    let mut next_image = hashes.iter().copied();
    let items = ids
        .iter()
        .map(|&id| match (Some(id) == tok.image).then(|| next_image.next()).flatten() {
            Some(h) => Item::Image(h),
            None => Item::Token(id),
        })
        .collect();
    Ok(Prompt { ids, items })
}

/// How many leading items of `new` the cache (holding `cached`) can keep: the common prefix, but never all of
/// `new` (the last position must be computed again for its logits).
pub fn reusable(cached: &[Item], new: &[Item]) -> usize {
    let common = cached.iter().zip(new).take_while(|(a, b)| a == b).count();
    common.min(new.len().saturating_sub(1))
}

/// Positions taken by `items`.
pub fn positions(items: &[Item], n_image_tokens: usize) -> usize {
    items.iter().map(|i| if matches!(i, Item::Image(_)) { n_image_tokens } else { 1 }).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuse_stops_at_the_first_difference_and_before_the_end() {
        use Item::*;
        let a = [Token(1), Image([7; 32]), Token(2), Token(3)];
        assert_eq!(reusable(&a, &[Token(1), Image([7; 32]), Token(2), Token(4), Token(5)]), 3);
        assert_eq!(reusable(&a, &[Token(1), Image([8; 32]), Token(2)]), 1, "another image is not reused");
        assert_eq!(reusable(&a, &a), 3, "the same prompt recomputes its last position");
        assert_eq!(reusable(&[], &a), 0);
        assert_eq!(positions(&a, 10), 13);
    }
}
