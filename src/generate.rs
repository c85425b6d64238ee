//! Decoding loops over a `Session`. Greedy for now; the samplers and beam search build on the same session API.

use anyhow::Result;

use crate::llm::{Input, Session};

/// Index of the largest value; the first one on ties, as `torch.argmax`.
pub fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold(0, |best, (i, &x)| if x > v[best] { i } else { best })
}

/// Greedy decoding of sequence 0 after a prefill whose last-row logits are `logits`, from position `pos`.
/// Calls `on_token` with each new id; stops after `n` tokens or at an end-of-generation id (which is returned
/// but not passed to `on_token`'s printing caller, who checks `eog`).
pub fn greedy(
    session: &mut Session<'_>,
    mut logits: Vec<f32>,
    mut pos: i32,
    n: usize,
    eog: &[u32],
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for _ in 0..n {
        let id = argmax(&logits) as u32;
        out.push(id);
        on_token(id)?;
        if eog.contains(&id) {
            break;
        }
        logits = session.prefill(Input::Tokens(&[id]), 0, pos, false)?;
        pos += 1;
    }
    Ok(out)
}
