//! Image decoding to 8-bit RGB the way PIL's `Image.open(f).convert("RGB")` does it.
//!
//! HF's processor is fed PIL images; stock transformers 4.45.1 even refuses L, P and RGBA, so users (and the
//! goldens) call `convert("RGB")` first. Per source type (checked against Pillow 10.4):
//! - RGB: as is. L (grey, incl. 1/2/4-bit, which PNG and PIL both scale to 0..255): copied to R, G, B.
//! - P (palette, PNG/GIF/BMP): palette lookup.
//! - RGBA / LA / transparency chunks: alpha is **dropped, not composited** (the colour under a transparent
//!   pixel is kept).
//! - 16-bit RGB, RGBA and LA PNG: PIL unpacks them with its `;16B` raw modes, i.e. keeps the **high byte**
//!   (`v >> 8`, truncation, not the rounded `v / 257`).
//! - 16-bit greyscale PNG: PIL opens it as mode `I;16` and its `I;16 -> RGB` conversion **clips** the value to
//!   0..=255 (so anything above 255 becomes white; a typical 16-bit photo comes out almost all white). We
//!   reproduce that for parity with the HF path, since the point of this module is to feed the model exactly
//!   what HF would; a runtime wanting a sensible picture should convert such images itself beforehand.
//!   This also applies with a tRNS chunk (still `I;16` in PIL), which is why the PNG header is read here.
//! - JPEG is decoded with `jpeg-decoder`, not the image crate's zune-jpeg: neither is libjpeg-turbo (PIL's
//!   decoder: different IDCT rounding, chroma upsampling and YCbCr tables), so pixels may differ by a few levels,
//!   but zune-jpeg 0.5 also interpolates the last column of a chroma-subsampled image with the block padding
//!   where libjpeg replicates the edge sample (9 levels off on the 30x45 fixture, against 3 for jpeg-decoder;
//!   measured bounds in tests/preprocess.rs).
//!   On PIL-written test JPEGs (4:2:0, 4:2:2, 4:4:4, progressive, odd sizes) jpeg-decoder stayed within
//!   3 levels, grey JPEG within 1.
//! - CMYK / YCCK JPEG: PIL reads them as Adobe-inverted `CMYK;I`, then `cmyk2rgb`:
//!   `R = (255 - K) - round(C * (255 - K) / 255)`; jpeg-decoder hands back the same (un-inverted) C, M, Y, K,
//!   so the same formula is applied here (a PIL-written CMYK JPEG came out within 1 level).
//! - WebP (lossless and lossy), BMP (24/32-bit, 8-bit palette, grey, 1-bit) and GIF (palette, grey,
//!   transparent index, animated): identical to PIL on the PIL-written test files that were checked.
//! - GIF: first frame, palette colours (also under the transparent index). Where the first frame does not
//!   cover the logical screen, the image crate leaves black, while PIL fills with the transparent index's
//!   colour (or palette entry 0).
//! - EXIF orientation is **not** applied (neither PIL's `open` nor HF applies it), ICC profiles are ignored.
//!
//! Guards: the width and height are read from the header before any pixel is decoded; an image with a zero
//! side or more than [`MAX_IMAGE_PIXELS`] pixels is refused.

use std::io::Cursor;
use std::path::Path;

use anyhow::{bail, Context, Result};
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};

/// PIL's default `Image.MAX_IMAGE_PIXELS` (about 0.25 GiB of 24-bit pixels; PIL warns above it and raises
/// `DecompressionBombError` above twice that). We refuse anything above it.
pub const MAX_IMAGE_PIXELS: u64 = 89_478_485;

/// The formats we decode (JPEG through jpeg-decoder, the others through the `image` features enabled in
/// Cargo.toml).
const FORMATS: &[ImageFormat] =
    &[ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::WebP, ImageFormat::Bmp, ImageFormat::Gif];

/// Reads and decodes an image file to 8-bit RGB (see the module docs for the conversion rules).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read the image file", path.display()))?;
    load_rgb_from_memory(&bytes, &path.display().to_string())
}

/// Decodes an encoded image held in memory; `name` (a file name, URL, request id...) names it in errors.
pub fn load_rgb_from_memory(bytes: &[u8], name: &str) -> Result<RgbImage> {
    let format = image::guess_format(bytes)
        .ok()
        .filter(|f| FORMATS.contains(f))
        .with_context(|| format!("{name}: not a supported image (JPEG, PNG, WebP, BMP or GIF expected)"))?;

    if format == ImageFormat::Jpeg {
        return decode_jpeg(bytes, name);
    }

    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    // The pixel guard below is the real limit; this only keeps the crate's own 512 MiB default from refusing
    // images PIL accepts (the largest allowed image as 16-bit RGBA is ~683 MiB).
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_IMAGE_PIXELS * 8 + (64 << 20));
    reader.limits(limits);
    let decoder = reader.into_decoder().with_context(|| format!("{name}: corrupt or unreadable {format:?} image"))?;

    // Header only so far: check the size before decoding any pixel data.
    let (w, h) = decoder.dimensions();
    check_dimensions(name, w, h)?;

    let img = DynamicImage::from_decoder(decoder)
        .with_context(|| format!("{name}: corrupt or unreadable {format:?} image"))?;
    let gray16_png = format == ImageFormat::Png && png_is_gray16(bytes);
    to_rgb_like_pil(img, gray16_png).with_context(|| format!("{name}: cannot convert the {format:?} image to RGB"))
}

/// Refuses an empty image or one above [`MAX_IMAGE_PIXELS`] (from the header, before the pixels are decoded).
fn check_dimensions(name: &str, w: u32, h: u32) -> Result<()> {
    if w == 0 || h == 0 {
        bail!("{name}: the image has zero size ({w}x{h})");
    }
    let pixels = w as u64 * h as u64;
    if pixels > MAX_IMAGE_PIXELS {
        bail!(
            "{name}: {w}x{h} = {pixels} pixels exceeds the limit of {MAX_IMAGE_PIXELS} (PIL's MAX_IMAGE_PIXELS): \
             refusing a possible decompression bomb"
        );
    }
    Ok(())
}

/// JPEG through jpeg-decoder: grey, YCbCr / RGB, and CMYK / YCCK (PIL's `cmyk2rgb`).
fn decode_jpeg(bytes: &[u8], name: &str) -> Result<RgbImage> {
    use jpeg_decoder::PixelFormat;
    let corrupt = || format!("{name}: corrupt or unreadable JPEG image");
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    // Markers up to the frame header only.
    decoder.read_info().with_context(corrupt)?;
    let info = decoder.info().with_context(corrupt)?;
    let (w, h) = (info.width as u32, info.height as u32);
    check_dimensions(name, w, h)?;
    let px = decoder.decode().with_context(corrupt)?;

    let n = w as usize * h as usize;
    if px.len() != n * info.pixel_format.pixel_bytes() {
        bail!("{name}: corrupt JPEG: {} bytes decoded for {w}x{h} {:?}", px.len(), info.pixel_format);
    }
    let rgb: Vec<u8> = match info.pixel_format {
        PixelFormat::RGB24 => px,
        PixelFormat::L8 => px.iter().flat_map(|&v| [v; 3]).collect(),
        PixelFormat::CMYK32 => px.chunks_exact(4).flat_map(|p| cmyk_to_rgb([p[0], p[1], p[2], p[3]])).collect(),
        // 12-bit / lossless JPEG: Pillow reads through libjpeg's 8-bit API and refuses them too, as far as we know.
        PixelFormat::L16 => bail!("{name}: 16-bit (12-bit or lossless) JPEG is not supported"),
    };
    RgbImage::from_raw(w, h, rgb).context("internal error: RGB buffer size")
}

/// Pillow's `cmyk2rgb`: `nk = 255 - K; R = nk - MULDIV255(C, nk)` where `MULDIV255(a, b)` is the exactly
/// rounded `a * b / 255` computed as `t = a * b + 128; ((t >> 8) + t) >> 8`.
fn cmyk_to_rgb(p: [u8; 4]) -> [u8; 3] {
    let nk = 255 - p[3] as i32;
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    [0, 1, 2].map(|c| (nk - muldiv255(p[c] as i32, nk)).clamp(0, 255) as u8)
}

/// True when the PNG's IHDR says 16-bit greyscale (colour type 0), which PIL opens as `I;16`. The image crate
/// reports such an image as `Luma16`, or `LumaA16` when a tRNS chunk is present, and only the header tells the
/// latter apart from a real 16-bit grey+alpha PNG (colour type 4, which PIL treats like the other 16-bit modes).
fn png_is_gray16(bytes: &[u8]) -> bool {
    // 8-byte signature, then the IHDR chunk: length (4), "IHDR", width (4), height (4), bit depth, colour type.
    bytes.len() >= 26 && &bytes[12..16] == b"IHDR" && bytes[24] == 16 && bytes[25] == 0
}

/// PIL `convert("RGB")` on what the image crate decoded (alpha dropped, not composited).
fn to_rgb_like_pil(img: DynamicImage, gray16_png: bool) -> Result<RgbImage> {
    let (w, h) = (img.width(), img.height());
    let n = w as usize * h as usize;
    let mut out: Vec<u8> = Vec::with_capacity(n * 3);
    match img {
        DynamicImage::ImageRgb8(b) => return Ok(b),
        DynamicImage::ImageRgba8(b) => b.pixels().for_each(|p| out.extend_from_slice(&p.0[..3])),
        DynamicImage::ImageLuma8(b) => b.pixels().for_each(|p| out.extend_from_slice(&[p.0[0]; 3])),
        DynamicImage::ImageLumaA8(b) => b.pixels().for_each(|p| out.extend_from_slice(&[p.0[0]; 3])),
        DynamicImage::ImageRgb16(b) => b.pixels().for_each(|p| out.extend(p.0.iter().map(|&v| high_byte(v)))),
        DynamicImage::ImageRgba16(b) => b.pixels().for_each(|p| out.extend(p.0[..3].iter().map(|&v| high_byte(v)))),
        // 16-bit grey PNG (PIL `I;16`): clipped, see the module docs.
        DynamicImage::ImageLuma16(b) => b.pixels().for_each(|p| out.extend_from_slice(&[clip_u16(p.0[0]); 3])),
        DynamicImage::ImageLumaA16(b) => {
            let conv = if gray16_png { clip_u16 } else { high_byte };
            b.pixels().for_each(|p| out.extend_from_slice(&[conv(p.0[0]); 3]))
        }
        other => bail!("unsupported pixel format {:?}", other.color()),
    }
    RgbImage::from_raw(w, h, out).context("internal error: RGB buffer size")
}

/// PIL's `;16B` unpackers keep the most significant byte.
fn high_byte(v: u16) -> u8 {
    (v >> 8) as u8
}

/// PIL's `I;16 -> RGB` (and `I;16 -> L`) conversion clips to 255.
fn clip_u16(v: u16) -> u8 {
    v.min(255) as u8
}
