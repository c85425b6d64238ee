//! A small reader for the `.npy` files of tests/fixtures (version 1.0/2.0 headers, C order, little-endian
//! `<f4`, `<f8`, `<i4`, `<i8`, `|u1`), returning f64 values and the shape.
#![allow(dead_code)]

use std::path::Path;

/// An array read from a `.npy` file.
pub struct Npy {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Npy {
    pub fn as_f32(&self) -> Vec<f32> {
        self.data.iter().map(|&v| v as f32).collect()
    }
}

pub fn read(path: &Path) -> Npy {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&b[..6], b"\x93NUMPY", "{}: not a .npy file", path.display());
    let (hlen, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        _ => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
    };
    let header = std::str::from_utf8(&b[start..start + hlen]).unwrap();
    assert!(header.contains("'fortran_order': False"), "{}: Fortran order", path.display());
    let descr = header.split("'descr': '").nth(1).and_then(|s| s.split('\'').next()).unwrap();
    let shape_txt = header.split("'shape': (").nth(1).and_then(|s| s.split(')').next()).unwrap();
    let shape: Vec<usize> =
        shape_txt.split(',').filter(|s| !s.trim().is_empty()).map(|s| s.trim().parse().unwrap()).collect();
    let body = &b[start + hlen..];
    let n: usize = shape.iter().product();
    let data: Vec<f64> = match descr {
        "<f4" => body.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        "<f8" => body.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
        "<i4" => body.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        "<i8" => body.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        "|u1" => body.iter().map(|&v| v as f64).collect(),
        d => panic!("{}: dtype {d} not handled", path.display()),
    };
    assert_eq!(data.len(), n, "{}: {} values for shape {shape:?}", path.display(), data.len());
    Npy { shape, data }
}
