//! A request's conversation as model input, and what of it the KV cache already holds. Chat clients send the
//! whole conversation with every request; the engine keeps earlier conversations' prompts and answers in its
//! slots and prefills only what differs after the longest common prefix (llama.cpp's server does the same), so
//! a follow-up about an image does not encode or prefill the image again.

use anyhow::Result;

use super::api::Message;
pub use crate::cache::items::{items_of, positions, reusable, Item};
use crate::chat::turn_ids;
use crate::tokenizer::Tokenizer;

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
    let items = items_of(&ids, tok.image, hashes);
    Ok(Prompt { ids, items })
}
