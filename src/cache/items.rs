//! A prompt as cache entries: tokens and whole images. What the KV cache holds is known by these (a prefix file,
//! a saved session, a server slot), and two prompts share cells exactly as far as their items agree.

/// One cache entry of a prompt: a token, or a whole image, which takes `n_image_tokens` positions. An image is
/// known by the blake3 hash of its decoded pixels: the same picture sent as PNG or as another file is the same
/// image, and no crafted collision can make one client's image stand for another's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Item {
    Token(u32),
    Image([u8; 32]),
}

/// The items of a prompt's token ids: each `image_token` stands for the next of `images` (their identities, in
/// order; an `image_token` past the last image stays a token, as the prompt's own check then reports).
pub fn items_of(ids: &[u32], image_token: Option<u32>, images: &[[u8; 32]]) -> Vec<Item> {
    let mut next_image = images.iter().copied();
    ids.iter()
        .map(|&id| match (Some(id) == image_token).then(|| next_image.next()).flatten() {
            Some(h) => Item::Image(h),
            None => Item::Token(id),
        })
        .collect()
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
