//! Target `detokenize`: the streaming detokenizer (what `serve` and `chat` print token by token) on arbitrary
//! token id sequences, ids out of the vocabulary included. The first byte's low bit is `skip_special`; the rest
//! are little-endian u16 ids.
//!
//! Oracle: the pieces streamed, then flushed, are exactly a whole decode of the ids when no byte-fallback token
//! is among them (with byte tokens, released text is never taken back: see `StreamDecoder`); out-of-vocabulary
//! ids are errors, not panics.

use super::Fuzzer;

impl Fuzzer {
    pub fn detokenize(&self, data: &[u8]) -> bool {
        let Some((&flags, rest)) = data.split_first() else { return false };
        let tok = &self.reference().tok;
        let skip_special = flags & 1 == 1;
        let ids: Vec<u32> = rest.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect();
        let mut stream = tok.stream(skip_special);
        let mut streamed = String::new();
        for &id in &ids {
            match stream.push(id) {
                Ok(piece) => streamed.push_str(&piece),
                Err(_) => {
                    assert!(id as usize >= tok.n_vocab(), "push({id}) failed for an id in the vocabulary");
                    return false;
                }
            }
        }
        match stream.flush() {
            Ok(piece) => streamed.push_str(&piece),
            Err(e) => panic!("flush failed after every push succeeded: {e:#}"),
        }
        assert_eq!(streamed, stream.text(), "text() is what was released");
        if ids.iter().all(|&id| tok.byte_of(id).is_none()) {
            let whole = tok.decode(&ids, skip_special).expect("ids in the vocabulary decode");
            assert_eq!(streamed, whole, "streamed vs whole decode of {ids:?}");
        }
        true
    }
}
