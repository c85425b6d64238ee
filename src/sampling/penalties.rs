//! The processors that run in every mode (hf-generation.md §2.1): repetition penalty, the non-HF
//! presence/frequency penalties, no-repeat n-gram, and the EOS masks of min length / min new tokens.
//! Each takes one row of scores and that row's whole history (the HF `input_ids` row: prompt, with one
//! `<image>` id per image, then the generated tokens).

use anyhow::{bail, Result};

/// Checks that every id indexes the row (torch's gather would raise otherwise).
fn check_ids(ids: &[u32], vocab: usize) -> Result<()> {
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        bail!("token id {bad} is outside the {vocab} scores of the row");
    }
    Ok(())
}

/// HF `RepetitionPenaltyLogitsProcessor`: `s < 0 ? s*θ : s/θ` for every id present in `ids`, applied through a
/// gather then scatter, so an id that occurs several times is penalized once. θ is used as f32.
pub fn repetition(scores: &mut [f32], ids: &[u32], theta: f32) -> Result<()> {
    check_ids(ids, scores.len())?;
    // Gather every value first, then scatter: duplicates read the original score and write the same result.
    let gathered: Vec<(usize, f32)> = ids
        .iter()
        .map(|&t| {
            let s = scores[t as usize];
            (t as usize, if s < 0.0 { s * theta } else { s / theta })
        })
        .collect();
    for (t, s) in gathered {
        scores[t] = s;
    }
    Ok(())
}

/// Non-HF, llama.cpp's `penalty_freq` / `penalty_present`: `s -= count*freq + (count > 0)*presence`.
pub fn presence_frequency(scores: &mut [f32], ids: &[u32], presence: f32, frequency: f32) -> Result<()> {
    check_ids(ids, scores.len())?;
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    for run in sorted.chunk_by(|a, b| a == b) {
        scores[run[0] as usize] -= run.len() as f32 * frequency + presence;
    }
    Ok(())
}

/// HF `NoRepeatNGramLogitsProcessor(n)`: masks every token that followed an earlier occurrence of the last
/// n-1 tokens, over every n-gram of the whole row (prompt included). For n = 1 every present token is masked.
pub fn no_repeat_ngram(scores: &mut [f32], ids: &[u32], n: usize) -> Result<()> {
    let len = ids.len();
    if n == 0 || len + 1 < n {
        return Ok(());
    }
    check_ids(ids, scores.len())?;
    let key = &ids[len + 1 - n..];
    // Every n-gram ids[i..i+n] (i + n <= len) whose first n-1 tokens equal the key bans its last token.
    for i in 0..(len + 1).saturating_sub(n) {
        if &ids[i..i + n - 1] == key {
            scores[ids[i + n - 1] as usize] = f32::NEG_INFINITY;
        }
    }
    Ok(())
}

/// Masks every EOS id (`MinLengthLogitsProcessor` / `MinNewTokensLengthLogitsProcessor`, once the caller has
/// decided that the length is still short).
pub fn mask_eos(scores: &mut [f32], eos: &[u32]) -> Result<()> {
    check_ids(eos, scores.len())?;
    for &e in eos {
        scores[e as usize] = f32::NEG_INFINITY;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    const NEG: f32 = f32::NEG_INFINITY;

    #[test]
    fn repetition_once_per_id_and_zero_divides() {
        let mut s = vec![2.0, -2.0, 0.0, 1.0];
        repetition(&mut s, &[0, 0, 1, 2, 0], 2.0).unwrap();
        assert_eq!(s, vec![1.0, -4.0, 0.0, 1.0]);
        assert!(repetition(&mut s, &[4], 2.0).is_err());
    }

    #[test]
    fn ngram_bans() {
        // n = 2: the last token 1 was followed by 2 and 3 before.
        let mut s = vec![0.0; 5];
        no_repeat_ngram(&mut s, &[1, 2, 1, 3, 1], 2).unwrap();
        assert_eq!(s, vec![0.0, 0.0, NEG, NEG, 0.0]);
        // n = 1: everything present.
        let mut s = vec![0.0; 5];
        no_repeat_ngram(&mut s, &[4, 0], 1).unwrap();
        assert_eq!(s, vec![NEG, 0.0, 0.0, 0.0, NEG]);
        // n = 3 with a history of length 1: L + 1 < n, nothing.
        let mut s = vec![0.0; 5];
        no_repeat_ngram(&mut s, &[4], 3).unwrap();
        assert_eq!(s, vec![0.0; 5]);
        // n = 3, history of length 2: key = both tokens, no complete earlier trigram.
        no_repeat_ngram(&mut s, &[4, 4], 3).unwrap();
        assert_eq!(s, vec![0.0; 5]);
        no_repeat_ngram(&mut s, &[4, 4, 4], 3).unwrap();
        assert_eq!(s, vec![0.0, 0.0, 0.0, 0.0, NEG]);
    }

    #[test]
    fn presence_frequency_counts() {
        let mut s = vec![0.0; 3];
        presence_frequency(&mut s, &[2, 2, 0], 0.5, 0.25).unwrap();
        assert_eq!(s, vec![-0.75, 0.0, -1.0]);
    }
}
