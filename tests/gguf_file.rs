//! GGUF written by ggml's writer (through `GgufWriter`) and read back through `GgufFile`: metadata and tensors
//! equal. Truncated or corrupted files give an error naming the file, never a crash.

mod common;

use std::io::Write;

use ggml::gguf::{Array, GgufFile, GgufWriter, Value};
use ggml::Type;

fn sample_values() -> Vec<(&'static str, Value)> {
    vec![
        ("general.architecture", Value::Str("llama".into())),
        ("general.name", Value::Str("テスト model ✓".into())),
        ("t.u8", Value::U8(200)),
        ("t.i8", Value::I8(-100)),
        ("t.u16", Value::U16(60000)),
        ("t.i16", Value::I16(-30000)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-2_000_000_000)),
        ("t.u64", Value::U64(u64::MAX - 1)),
        ("t.i64", Value::I64(i64::MIN + 1)),
        ("t.f32", Value::F32(1e-5)),
        ("t.f64", Value::F64(std::f64::consts::PI)),
        ("t.bool", Value::Bool(true)),
        ("t.arr_str", Value::Array(Array::Str(vec!["<s>".into(), "▁こんにちは".into(), "".into()]))),
        ("t.arr_f32", Value::Array(Array::F32(vec![0.5, -1.25, 3.0]))),
        ("t.arr_i32", Value::Array(Array::I32(vec![26]))),
        ("t.arr_bool", Value::Array(Array::Bool(vec![true, false, true]))),
        ("t.arr_u8", Value::Array(Array::U8(vec![]))),
    ]
}

/// Writes a GGUF with the sample keys and three tensors (F32, F16, Q8_0); returns the path and tensor bytes.
fn write_sample(dir: &std::path::Path) -> (std::path::PathBuf, Vec<(String, Type, Vec<usize>, Vec<u8>)>) {
    let (mut rng, _) = common::rng();
    let tensors: Vec<(String, Type, Vec<usize>, Vec<u8>)> = [
        ("token_embd.weight", Type::F32, vec![64, 10]),
        ("blk.0.attn_norm.weight", Type::F16, vec![64]),
        ("blk.0.attn_q.weight", Type::Q8_0, vec![64, 3]),
    ]
    .into_iter()
    .map(|(name, ty, ne)| {
        let n: usize = ne.iter().product();
        let bytes = ggml::quantize(ty, &common::uniform(&mut rng, n), ne[0], None).unwrap();
        (name.to_string(), ty, ne, bytes)
    })
    .collect();
    let mut w = GgufWriter::new(tensors.len()).unwrap();
    for (k, v) in sample_values() {
        w.set(k, v).unwrap();
    }
    for (name, ty, ne, _) in &tensors {
        w.add_tensor(name, *ty, ne).unwrap();
    }
    let path = dir.join("sample.gguf");
    let mut f = std::fs::File::create(&path).unwrap();
    w.write(&mut f, |i, _, sink| sink.write_all(&tensors[i].3)).unwrap();
    f.flush().unwrap();
    (path, tensors)
}

#[test]
fn written_file_reads_back_equal() {
    let dir = tempfile::tempdir().unwrap();
    let (path, tensors) = write_sample(dir.path());
    let mut f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    let values = sample_values();
    assert_eq!(f.keys(), values.iter().map(|(k, _)| k.to_string()).collect::<Vec<_>>());
    for (k, v) in &values {
        assert_eq!(f.get(k).as_ref(), Some(v), "key {k}");
    }
    assert_eq!(f.u32("t.u32").unwrap(), 4_000_000_000);
    let err = f.u32("t.f32").unwrap_err().to_string();
    assert!(err.contains("t.f32") && err.contains("expected u32"), "{err}");
    assert!(f.str("missing.key").unwrap_err().to_string().contains("missing.key"));

    f.map_weights().unwrap();
    assert_eq!(f.tensor_infos().len(), tensors.len());
    for ((name, ty, ne, bytes), info) in tensors.iter().zip(f.tensor_infos()) {
        assert_eq!((&info.name, info.ty, &info.ne), (name, *ty, ne));
        assert_eq!(info.offset % 32, 0);
        assert_eq!(&f.tensor_bytes(name).unwrap(), bytes, "data of {name}");
        let t = f.tensor(name).unwrap();
        assert_eq!(t.ty(), *ty);
    }
}

#[test]
fn damaged_files_give_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = write_sample(dir.path());
    let good = std::fs::read(&path).unwrap();
    let header_len = GgufFile::open(&path).unwrap().data_offset();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("data truncated", good[..good.len() - 40].to_vec()),
        ("header truncated", good[..header_len / 2].to_vec()),
        ("bad magic", [b"GGUX".as_slice(), &good[4..]].concat()),
        ("version 1", [&good[..4], &1u32.to_le_bytes()[..], &good[8..]].concat()),
        ("huge tensor count", [&good[..8], &u64::MAX.to_le_bytes()[..], &good[16..]].concat()),
        ("garbage", (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect()),
    ];
    for (what, bytes) in cases {
        let p = dir.path().join(format!("{}.gguf", what.replace(' ', "_")));
        std::fs::write(&p, &bytes).unwrap();
        match GgufFile::open(&p) {
            Ok(_) => panic!("{what}: damaged file accepted"),
            Err(e) => assert!(e.to_string().contains(&p.display().to_string()), "{what}: error lacks the path: {e}"),
        }
    }
    let missing = GgufFile::open(dir.path().join("nope.gguf")).err().expect("missing file accepted").to_string();
    assert!(missing.contains("nope.gguf"), "{missing}");
}

#[test]
fn writer_rejects_bad_tensors() {
    let mut w = GgufWriter::new(4).unwrap();
    w.add_tensor("a", Type::F32, &[4]).unwrap();
    assert!(w.add_tensor("a", Type::F32, &[4]).is_err(), "duplicate");
    assert!(w.add_tensor("b", Type::Q4K, &[100]).is_err(), "row not a multiple of 256");
    assert!(w.add_tensor(&"x".repeat(64), Type::F32, &[4]).is_err(), "name too long");
}
