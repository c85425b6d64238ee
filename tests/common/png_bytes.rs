//! PNG chunks by hand (no encoder involved), for tests of the decoder's guards and conversion rules. Shared by
//! the integration tests (`common::png_bytes`) and the unit tests of src/preprocess (through `#[path]`).
#![allow(dead_code)]

/// zlib's CRC-32 (the PNG chunk checksum), bit by bit.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// One chunk: length, kind, data, CRC of kind + data.
pub fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut v = (data.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(kind);
    v.extend_from_slice(data);
    let mut c = kind.to_vec();
    c.extend_from_slice(data);
    v.extend_from_slice(&crc32(&c).to_be_bytes());
    v
}
