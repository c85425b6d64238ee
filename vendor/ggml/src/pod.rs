//! `Pod`: element types whose every bit pattern is a valid value, so tensor bytes can be copied into them.

mod sealed {
    pub trait Sealed {}
}

/// Plain element types that tensor data may be read into or written from.
pub trait Pod: Copy + Default + sealed::Sealed + 'static {}

macro_rules! pod {
    ($($t:ty),*) => { $( impl sealed::Sealed for $t {} impl Pod for $t {} )* };
}
pod!(u8, i8, u16, i16, u32, i32, u64, i64, f32, f64, half::f16, half::bf16);
