//! Hostile DICOM and NIfTI files (issue 25), written byte by byte here: sequences nested
//! past any stack, lengths that claim gigabytes the file does not hold, deflate and gzip
//! bombs, NIfTI headers whose fields overflow. Each must give a one-line error naming the
//! problem, within bounded memory, and never abort the process; valid files of the same
//! shapes must still load. `decode_cost` must refuse what the decode refuses, and bound
//! what it spends.

use std::io::Write;
use std::path::{Path, PathBuf};

use medvlm::processor::image::medical::decode_cost;
use medvlm::processor::image::{decode_rgb, load_rgb};

// ---- DICOM, by hand ----

/// The four ways a data set is encoded that nesting is tested in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Enc {
    Implicit,
    ExplicitLe,
    ExplicitBe,
    /// Explicit VR little endian, deflated.
    Deflated,
}

const ALL_ENCODINGS: [Enc; 4] = [
    Enc::Implicit,
    Enc::ExplicitLe,
    Enc::ExplicitBe,
    Enc::Deflated,
];

impl Enc {
    fn ts(self) -> &'static str {
        match self {
            Enc::Implicit => "1.2.840.10008.1.2",
            Enc::ExplicitLe => "1.2.840.10008.1.2.1",
            Enc::ExplicitBe => "1.2.840.10008.1.2.2",
            Enc::Deflated => "1.2.840.10008.1.2.1.99",
        }
    }
    fn big(self) -> bool {
        self == Enc::ExplicitBe
    }
    fn explicit(self) -> bool {
        self != Enc::Implicit
    }
    fn u16(self, v: u16) -> [u8; 2] {
        if self.big() {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    }
    fn u32(self, v: u32) -> [u8; 4] {
        if self.big() {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    }
}

const UNDEFINED: u32 = 0xFFFF_FFFF;

/// VRs with a 2-byte length in explicit VR (PS3.5 7.1.2).
fn short_vr(vr: &[u8; 2]) -> bool {
    [
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
        b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    ]
    .contains(&vr)
}

/// A data set being written.
struct Ds {
    enc: Enc,
    out: Vec<u8>,
}

impl Ds {
    fn new(enc: Enc) -> Self {
        Self {
            enc,
            out: Vec::new(),
        }
    }
    fn tag(&mut self, group: u16, element: u16) {
        let (g, e) = (self.enc.u16(group), self.enc.u16(element));
        self.out.extend_from_slice(&g);
        self.out.extend_from_slice(&e);
    }
    /// An element header declaring `len` bytes (whatever follows).
    fn header(&mut self, group: u16, element: u16, vr: &[u8; 2], len: u32) -> &mut Self {
        self.tag(group, element);
        if self.enc.explicit() {
            self.out.extend_from_slice(vr);
            if short_vr(vr) {
                let len = u16::try_from(len).expect("short VR length");
                self.out.extend_from_slice(&self.enc.u16(len));
                return self;
            }
            self.out.extend_from_slice(&[0, 0]);
        }
        self.out.extend_from_slice(&self.enc.u32(len));
        self
    }
    fn element(&mut self, group: u16, element: u16, vr: &[u8; 2], value: &[u8]) -> &mut Self {
        assert!(value.len().is_multiple_of(2), "odd value length");
        self.header(group, element, vr, value.len() as u32);
        self.out.extend_from_slice(value);
        self
    }
    fn us(&mut self, group: u16, element: u16, v: u16) -> &mut Self {
        let b = self.enc.u16(v);
        self.element(group, element, b"US", &b)
    }
    /// An item, item delimiter or sequence delimiter header (no VR in any encoding).
    fn delimiter(&mut self, element: u16, len: u32) -> &mut Self {
        self.tag(0xFFFE, element);
        self.out.extend_from_slice(&self.enc.u32(len));
        self
    }
    fn item(&mut self, len: u32) -> &mut Self {
        self.delimiter(0xE000, len)
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.out.extend_from_slice(b);
        self
    }
}

fn padded(s: &str, pad: u8) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    if v.len() % 2 == 1 {
        v.push(pad);
    }
    v
}

/// A part 10 file: preamble, "DICM", file meta group (explicit VR little endian), then the
/// data set (deflated for `Enc::Deflated`).
fn part10(ts: &str, dataset: &[u8], deflate: bool) -> Vec<u8> {
    let mut meta = Ds::new(Enc::ExplicitLe);
    meta.element(0x0002, 0x0001, b"OB", &[0, 1])
        .element(
            0x0002,
            0x0002,
            b"UI",
            &padded("1.2.840.10008.5.1.4.1.1.7", 0),
        )
        .element(0x0002, 0x0003, b"UI", &padded("1.2.3.4", 0))
        .element(0x0002, 0x0010, b"UI", &padded(ts, 0))
        .element(0x0002, 0x0012, b"UI", &padded("1.2.3.4.5", 0));
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    let mut group = Ds::new(Enc::ExplicitLe);
    group.element(
        0x0002,
        0x0000,
        b"UL",
        &(meta.out.len() as u32).to_le_bytes(),
    );
    out.extend_from_slice(&group.out);
    out.extend_from_slice(&meta.out);
    if deflate {
        let mut z = flate2::write::DeflateEncoder::new(out, flate2::Compression::fast());
        z.write_all(dataset).unwrap();
        z.finish().unwrap()
    } else {
        out.extend_from_slice(dataset);
        out
    }
}

/// The data set's encoding for writing (a deflated one is written explicit little endian).
fn writing(enc: Enc) -> Enc {
    if enc == Enc::Deflated {
        Enc::ExplicitLe
    } else {
        enc
    }
}

/// A file of `enc` around the data set that `body` writes.
fn dicom(enc: Enc, body: impl FnOnce(&mut Ds)) -> Vec<u8> {
    let mut ds = Ds::new(writing(enc));
    body(&mut ds);
    part10(enc.ts(), &ds.out, enc == Enc::Deflated)
}

/// The SOP attributes at the start of every test data set.
fn sop(ds: &mut Ds) {
    ds.element(
        0x0008,
        0x0016,
        b"UI",
        &padded("1.2.840.10008.5.1.4.1.1.7", 0),
    )
    .element(0x0008, 0x0018, b"UI", &padded("1.2.3.4", 0));
}

/// The image pixel module of a `cols` x `rows` 16-bit grey image (no Pixel Data).
fn pixel_module(ds: &mut Ds, rows: u16, cols: u16) {
    ds.us(0x0028, 0x0002, 1)
        .element(0x0028, 0x0004, b"CS", b"MONOCHROME2 ")
        .us(0x0028, 0x0010, rows)
        .us(0x0028, 0x0011, cols)
        .us(0x0028, 0x0100, 16)
        .us(0x0028, 0x0101, 16)
        .us(0x0028, 0x0102, 15)
        .us(0x0028, 0x0103, 0);
}

/// The 4x4 ramp every valid test image holds: sample i is 16 i, so that with the data's own
/// range (0..240) as window, pixel i is level 17 i.
fn ramp_pixels(ds: &mut Ds) {
    let enc = ds.enc;
    let px: Vec<u8> = (0..16u16).flat_map(|i| enc.u16(i * 16)).collect();
    ds.element(0x7FE0, 0x0010, b"OW", &px);
}

/// `depth` sequences (Referenced Series Sequence, SQ in the dictionary) each in an item of
/// the one outside, around one UI element; undefined lengths with delimiters, or defined
/// lengths. Written in two loops: a builder that recursed would overflow itself.
fn nested(ds: &mut Ds, depth: usize, defined: bool) {
    let inner = {
        let mut d = Ds::new(ds.enc);
        d.element(0x0008, 0x1150, b"UI", &padded("1.2.3", 0));
        d.out
    };
    let seq_header = if ds.enc.explicit() { 12 } else { 8 };
    for level in 0..depth {
        if defined {
            let below = (depth - 1 - level) as u32;
            let item = inner.len() as u32 + below * (seq_header + 8);
            ds.header(0x0008, 0x1115, b"SQ", item + 8).item(item);
        } else {
            ds.header(0x0008, 0x1115, b"SQ", UNDEFINED).item(UNDEFINED);
        }
    }
    ds.bytes(&inner);
    if !defined {
        for _ in 0..depth {
            ds.delimiter(0xE00D, 0).delimiter(0xE0DD, 0);
        }
    }
}

/// The 4x4 ramp image with `depth` nested sequences before its pixel module.
fn nested_image(enc: Enc, depth: usize, defined: bool) -> Vec<u8> {
    dicom(enc, |ds| {
        sop(ds);
        nested(ds, depth, defined);
        pixel_module(ds, 4, 4);
        ramp_pixels(ds);
    })
}

fn expected_ramp() -> Vec<u8> {
    (0..16u8).flat_map(|i| [17 * i; 3]).collect()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write test file");
    path
}

/// A load that must fail: the error, checked to be one line naming the file.
fn refused(path: &Path) -> String {
    let err = load_rgb(path)
        .expect_err(&format!("{} must be refused", path.display()))
        .to_string();
    assert!(
        err.starts_with(&path.display().to_string()),
        "error does not name the file: {err}"
    );
    assert!(!err.contains('\n'), "error is not one line: {err}");
    assert!(!err.contains("panicked"), "a panic became the error: {err}");
    err
}

// ---- Nesting ----

#[test]
fn nested_sequences_within_the_limit_still_load() {
    let dir = tempfile::tempdir().unwrap();
    for enc in ALL_ENCODINGS {
        for (depth, defined) in [
            (0, false),
            (1, true),
            (100, false),
            (100, true),
            (128, false),
        ] {
            let path = write(
                dir.path(),
                &format!("n{depth}-{enc:?}.dcm"),
                &nested_image(enc, depth, defined),
            );
            let img = load_rgb(&path).unwrap_or_else(|e| panic!("{enc:?} depth {depth}: {e}"));
            assert_eq!((img.width(), img.height()), (4, 4));
            assert_eq!(img.as_raw(), &expected_ramp(), "{enc:?} depth {depth}");
        }
    }
}

#[test]
fn deep_nesting_is_refused_in_every_encoding() {
    let dir = tempfile::tempdir().unwrap();
    for enc in ALL_ENCODINGS {
        for depth in [129, 2_400, 20_000, 200_000] {
            for defined in [false, true] {
                let name = format!("deep{depth}-{defined}-{enc:?}.dcm");
                let path = write(dir.path(), &name, &nested_image(enc, depth, defined));
                let err = refused(&path);
                assert!(err.contains("nested more than 128 deep"), "{name}: {err}");
                let bytes = std::fs::read(&path).unwrap();
                let cost = decode_cost(&path, &bytes)
                    .expect_err("decode_cost")
                    .to_string();
                assert!(cost.contains("nested more than 128"), "{name}: {cost}");
            }
        }
    }
}

/// The deepest file accepted parses on a thread with half the stack of the server's
/// decoding threads (2 MiB): the limit leaves room for dicom-rs' recursion in any build.
#[test]
fn max_depth_fits_a_small_stack() {
    let bytes = nested_image(Enc::Implicit, 128, false);
    let img = std::thread::Builder::new()
        .stack_size(1 << 20)
        .spawn(move || decode_rgb(&bytes).map(|i| i.into_raw()))
        .unwrap()
        .join()
        .expect("no panic")
        .expect("depth 128 loads");
    assert_eq!(img, expected_ramp());
}

// ---- Lying lengths ----

/// A file whose element (or item) declares far more bytes than follow.
struct Liar {
    name: &'static str,
    bytes: Vec<u8>,
    /// What the error must say.
    says: &'static str,
}

fn liars() -> Vec<Liar> {
    const HUGE: u32 = 0xFFFF_FFF0;
    let mut v = Vec::new();
    for enc in [Enc::Implicit, Enc::ExplicitLe, Enc::ExplicitBe] {
        let (name, bytes) = match enc {
            // A Patient's Name with a 4-byte length: only implicit VR has one for PN.
            Enc::Implicit => (
                "string-implicit",
                dicom(enc, |ds| {
                    sop(ds);
                    ds.header(0x0010, 0x0010, b"PN", HUGE).bytes(b"Doe^John");
                }),
            ),
            Enc::ExplicitLe => (
                "string-explicit-le",
                dicom(enc, |ds| {
                    sop(ds);
                    ds.header(0x0040, 0xA160, b"UT", HUGE).bytes(b"some text");
                }),
            ),
            _ => (
                "string-explicit-be",
                dicom(enc, |ds| {
                    sop(ds);
                    ds.header(0x0040, 0xA160, b"UT", HUGE).bytes(b"some text");
                }),
            ),
        };
        v.push(Liar {
            name,
            bytes,
            says: "declares 4294967280 bytes",
        });
    }
    v.push(Liar {
        name: "pixel-data",
        bytes: dicom(Enc::ExplicitLe, |ds| {
            sop(ds);
            pixel_module(ds, 4, 4);
            ds.header(0x7FE0, 0x0010, b"OW", HUGE).bytes(&[0; 32]);
        }),
        says: "element (7FE0,0010) declares 4294967280 bytes",
    });
    v.push(Liar {
        name: "defined-sequence",
        bytes: dicom(Enc::ExplicitLe, |ds| {
            sop(ds);
            ds.header(0x0008, 0x1115, b"SQ", 0x7FFF_FFF0)
                .item(8)
                .bytes(&[0; 8]);
        }),
        says: "element (0008,1115) declares 2147483632 bytes",
    });
    v.push(Liar {
        name: "item",
        bytes: dicom(Enc::Implicit, |ds| {
            sop(ds);
            ds.header(0x0008, 0x1115, b"SQ", UNDEFINED)
                .item(HUGE)
                .bytes(&[0; 16]);
        }),
        says: "element (FFFE,E000) declares 4294967280 bytes",
    });
    v.push(Liar {
        name: "item-beyond-its-sequence",
        bytes: dicom(Enc::ExplicitLe, |ds| {
            sop(ds);
            // The sequence holds 16 bytes; its item claims 1000 (the file has them).
            ds.header(0x0008, 0x1115, b"SQ", 16)
                .item(1000)
                .bytes(&[0; 1000]);
        }),
        says: "declares 1000 bytes but only 8 remain",
    });
    v.push(Liar {
        name: "fragment",
        bytes: dicom_rle(|ds| {
            ds.item(0).item(HUGE).bytes(&[0; 64]);
        }),
        says: "element (FFFE,E000) declares 4294967280 bytes",
    });
    v.push(Liar {
        name: "meta-element",
        bytes: {
            // (0002,0002) written as OB, so with a 4-byte length.
            let mut f = part10(Enc::ExplicitLe.ts(), &[], false);
            let at = f.windows(4).position(|w| w == [2, 0, 2, 0]).unwrap();
            let mut lie = vec![2, 0, 2, 0, b'O', b'B', 0, 0];
            lie.extend_from_slice(&HUGE.to_le_bytes());
            f.splice(at..at + 8, lie);
            f
        },
        says: "element (0002,0002) declares 4294967280 bytes",
    });
    v.push(Liar {
        name: "deflated-string",
        bytes: dicom(Enc::Deflated, |ds| {
            sop(ds);
            ds.header(0x0040, 0xA160, b"UT", HUGE).bytes(b"some text");
        }),
        says: "declares 4294967280 bytes but the data ends after 9",
    });
    v
}

/// An RLE Lossless file of a 4x4 16-bit image whose pixel data items `items` writes.
fn dicom_rle(items: impl FnOnce(&mut Ds)) -> Vec<u8> {
    let mut ds = Ds::new(Enc::ExplicitLe);
    sop(&mut ds);
    pixel_module(&mut ds, 4, 4);
    ds.header(0x7FE0, 0x0010, b"OB", UNDEFINED);
    items(&mut ds);
    part10("1.2.840.10008.1.2.5", &ds.out, false)
}

#[test]
fn lying_lengths_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    for liar in liars() {
        let path = write(dir.path(), &format!("{}.dcm", liar.name), &liar.bytes);
        let err = refused(&path);
        assert!(err.contains(liar.says), "{}: {err}", liar.name);
        let cost = decode_cost(&path, &liar.bytes).expect_err(liar.name);
        assert!(
            cost.to_string().contains(liar.says),
            "{}: {cost}",
            liar.name
        );
    }
}

/// Sizes the header declares that the pixel data does not back.
#[test]
fn pixel_data_must_back_the_declared_frames() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "frames",
            dicom(Enc::ExplicitLe, |ds| {
                sop(ds);
                ds.element(0x0028, 0x0008, b"IS", b"1000");
                pixel_module(ds, 4096, 4096);
                ds.element(0x7FE0, 0x0010, b"OW", &[0; 32]);
            }),
            "the pixel data holds 32 bytes, but 1000 frame(s) of 4096x4096 pixels need \
             33554432000",
        ),
        (
            "frames-4g",
            dicom(Enc::Implicit, |ds| {
                sop(ds);
                ds.element(0x0028, 0x0008, b"IS", b"4294967295");
                pixel_module(ds, 4, 4);
                ramp_pixels(ds);
            }),
            "but 4294967295 frame(s) of 4x4 pixels need",
        ),
        (
            "short-frame",
            dicom(Enc::ExplicitBe, |ds| {
                sop(ds);
                pixel_module(ds, 4, 4);
                ds.element(0x7FE0, 0x0010, b"OW", &[0; 30]);
            }),
            "the pixel data holds 30 bytes, but 1 frame(s) of 4x4 pixels need 32",
        ),
        (
            "fragments",
            {
                let mut ds = Ds::new(Enc::ExplicitLe);
                sop(&mut ds);
                ds.element(0x0028, 0x0008, b"IS", b"1000000 ");
                pixel_module(&mut ds, 4, 4);
                ds.header(0x7FE0, 0x0010, b"OB", UNDEFINED)
                    .item(0)
                    .item(8)
                    .bytes(&[0; 8])
                    .delimiter(0xE0DD, 0);
                part10("1.2.840.10008.1.2.5", &ds.out, false)
            },
            "the pixel data holds 1 fragment(s) for 1000000 frame(s)",
        ),
        (
            "bits-allocated",
            dicom(Enc::ExplicitLe, |ds| {
                sop(ds);
                ds.us(0x0028, 0x0010, 4)
                    .us(0x0028, 0x0011, 4)
                    .us(0x0028, 0x0100, 64);
                ds.element(0x7FE0, 0x0010, b"OW", &[0; 128]);
            }),
            "64 bits allocated are not supported",
        ),
        (
            "samples",
            dicom(Enc::ExplicitLe, |ds| {
                sop(ds);
                ds.us(0x0028, 0x0002, 4)
                    .us(0x0028, 0x0010, 4)
                    .us(0x0028, 0x0011, 4)
                    .us(0x0028, 0x0100, 8);
                ds.element(0x7FE0, 0x0010, b"OB", &[0; 64]);
            }),
            "4 samples per pixel",
        ),
        (
            "rows-cols",
            dicom(Enc::ExplicitLe, |ds| {
                sop(ds);
                pixel_module(ds, 65535, 65535);
                ds.element(0x7FE0, 0x0010, b"OW", &[0; 32]);
            }),
            "65535x65535 = 4294836225 pixels, more than",
        ),
        (
            "jpeg-lossless-frame-header",
            {
                // DICOM says 8x8; the JPEG stream's frame header says 60000x60000.
                let mut ds = Ds::new(Enc::ExplicitLe);
                sop(&mut ds);
                pixel_module(&mut ds, 8, 8);
                let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xC3, 0, 11, 16];
                jpeg.extend_from_slice(&60000u16.to_be_bytes());
                jpeg.extend_from_slice(&60000u16.to_be_bytes());
                jpeg.extend_from_slice(&[1, 1, 0x11, 0, 0xFF, 0xD9]);
                jpeg.push(0);
                ds.header(0x7FE0, 0x0010, b"OB", UNDEFINED)
                    .item(0)
                    .item(jpeg.len() as u32)
                    .bytes(&jpeg)
                    .delimiter(0xE0DD, 0);
                part10("1.2.840.10008.1.2.4.70", &ds.out, false)
            },
            "the JPEG image is 60000x60000 but the DICOM header says 8x8",
        ),
    ];
    for (name, bytes, says) in cases {
        let path = write(dir.path(), &format!("{name}.dcm"), &bytes);
        let err = refused(&path);
        assert!(err.contains(says), "{name}: {err}");
        if name != "jpeg-lossless-frame-header" {
            // Header-only: the JPEG stream's own header is read by the decode.
            let cost = decode_cost(&path, &bytes).expect_err(name).to_string();
            assert!(cost.contains(says), "{name}: {cost}");
        }
    }
}

/// A deflated data set is inflated as a stream and refused past 512 MiB: here 600 MiB of
/// zeros (under 3 MiB deflated, at the fast level) in an honest OB element.
fn deflate_bomb() -> Vec<u8> {
    let mut head = Ds::new(Enc::ExplicitLe);
    sop(&mut head);
    const LEN: u32 = 600 << 20;
    head.header(0x0009, 0x1010, b"OB", LEN);
    let mut out = part10(Enc::Deflated.ts(), &[], false);
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(&head.out).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(LEN >> 20) {
        z.write_all(&zeros).unwrap();
    }
    out.extend_from_slice(&z.finish().unwrap());
    out
}

#[test]
fn deflate_bomb_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = deflate_bomb();
    assert!(bytes.len() < 4 << 20, "{} bytes", bytes.len());
    let path = write(dir.path(), "bomb.dcm", &bytes);
    let err = refused(&path);
    assert!(err.contains("inflates to more than 512 MiB"), "{err}");
    let cost = decode_cost(&path, &bytes).expect_err("bomb").to_string();
    assert!(cost.contains("inflates to more than 512 MiB"), "{cost}");
}

// ---- NIfTI, by hand ----

/// A NIfTI-1 single file (`n+1`) header: little endian, `dims` (dim[0] = its length),
/// `datatype`/`bitpix`, `vox_offset`, no scaling.
fn nifti_header(dims: &[u16], datatype: i16, bitpix: i16, vox_offset: f32) -> Vec<u8> {
    let mut h = vec![0u8; 348];
    h[0..4].copy_from_slice(&348i32.to_le_bytes());
    h[40..42].copy_from_slice(&(dims.len() as u16).to_le_bytes());
    for (i, d) in dims.iter().enumerate() {
        h[42 + 2 * i..44 + 2 * i].copy_from_slice(&d.to_le_bytes());
    }
    h[70..72].copy_from_slice(&datatype.to_le_bytes());
    h[72..74].copy_from_slice(&bitpix.to_le_bytes());
    // pixdim[0] = 1 (qfac), pixdim[1..] = 1.
    for i in 0..8 {
        h[76 + 4 * i..80 + 4 * i].copy_from_slice(&1f32.to_le_bytes());
    }
    h[108..112].copy_from_slice(&vox_offset.to_le_bytes());
    h[344..348].copy_from_slice(b"n+1\0");
    h
}

/// A 4x4x1 uint8 ramp (voxel (i, j) = 16 (4 j + i)) from byte 352: the valid file the
/// hostile headers are variations of.
fn nifti_ramp(vox_offset: f32) -> Vec<u8> {
    let mut f = nifti_header(&[4, 4, 1], 2, 8, vox_offset);
    f.extend_from_slice(&[0; 4]);
    f.extend((0..16u8).map(|v| v * 16));
    f
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(bytes).unwrap();
    z.finish().unwrap()
}

/// The ramp's picture: rows top to bottom are j = 3..0 (`flipud(slice.T)`), levels 17 v.
fn nifti_ramp_picture() -> Vec<u8> {
    (0..4u8)
        .rev()
        .flat_map(|j| (0..4u8).map(move |i| 17 * (4 * j + i)))
        .flat_map(|v| [v; 3])
        .collect()
}

#[test]
fn nifti_header_fields_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    // The valid file first, so that the variations below fail for their field alone.
    for (name, bytes) in [
        ("ok.nii", nifti_ramp(352.0)),
        ("ok.nii.gz", gzip(&nifti_ramp(352.0))),
    ] {
        let path = write(dir.path(), name, &bytes);
        let img = load_rgb(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(img.as_raw(), &nifti_ramp_picture(), "{name}");
        assert!(decode_cost(&path, &bytes).is_ok());
    }
    let with = |dims: &[u16], datatype: i16, bitpix: i16, off: f32| {
        let mut f = nifti_header(dims, datatype, bitpix, off);
        f.extend_from_slice(&[0; 4]);
        f.extend((0..16u8).map(|v| v * 16));
        f
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("neg", nifti_ramp(-352.0), "vox_offset -352"),
        ("nan", nifti_ramp(f32::NAN), "vox_offset NaN"),
        ("inf", nifti_ramp(f32::INFINITY), "vox_offset inf"),
        (
            "huge",
            nifti_ramp(1e30),
            "vox_offset 1000000000000000000000000000000",
        ),
        (
            "beyond",
            nifti_ramp(1e6),
            "vox_offset 1000000 is past the end of the file (368 bytes)",
        ),
        (
            "overflow",
            with(&[32767; 7], 2, 8, 352.0),
            "describe more than 2^64 bytes",
        ),
        (
            "overflow-float64",
            with(&[32767, 32767, 32767, 32767, 1024], 64, 64, 352.0),
            "describe more than 2^64 bytes",
        ),
        (
            "large",
            with(&[2048, 2048, 1000], 4, 16, 352.0),
            "368 bytes, but the header describes 8388608000 bytes of voxels from byte 352",
        ),
        (
            "bitpix",
            with(&[4, 4, 1], 2, 16, 352.0),
            "bitpix 16 does not match datatype 2 (8 bits per voxel)",
        ),
        (
            "zero-dim",
            with(&[4, 0, 1], 2, 8, 352.0),
            "dimensions [4, 0, 1]",
        ),
        (
            "negative-dim",
            with(&[4, 0xFFFC, 1], 2, 8, 352.0),
            "dimensions [4, 65532, 1]",
        ),
    ];
    for (name, bytes, says) in cases {
        for gz in [false, true] {
            let (file, bytes) = if gz {
                (format!("{name}.nii.gz"), gzip(&bytes))
            } else {
                (format!("{name}.nii"), bytes.clone())
            };
            // A .nii.gz's length is only known by inflating it: "beyond" and "large" are
            // refused there as truncated data.
            let says = match (gz, name) {
                (true, "beyond" | "large") => "truncated NIfTI file",
                _ => says,
            };
            let path = write(dir.path(), &file, &bytes);
            let err = refused(&path);
            assert!(err.contains(says), "{file}: {err}");
            if !(gz && matches!(name, "beyond" | "large")) {
                let cost = decode_cost(&path, &bytes).expect_err(&file).to_string();
                assert!(cost.contains(says), "{file}: {cost}");
            }
        }
    }
}

/// A `.hdr` + `.img` pair: the `.img` must hold the volume from vox_offset, by its size.
#[test]
fn nifti_pair_image_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let pair = |name: &str, vox_offset: f32, img: &[u8]| {
        let mut hdr = nifti_header(&[4, 4, 1], 2, 8, vox_offset);
        hdr[344..348].copy_from_slice(b"ni1\0");
        hdr.extend_from_slice(&[0; 4]);
        write(dir.path(), &format!("{name}.img"), img);
        write(dir.path(), &format!("{name}.hdr"), &hdr)
    };
    let ramp: Vec<u8> = (0..16u8).map(|v| v * 16).collect();
    let ok = pair("ok", 0.0, &ramp);
    assert_eq!(load_rgb(&ok).unwrap().as_raw(), &nifti_ramp_picture());
    for (name, offset, says) in [
        (
            "short",
            1.0,
            "15 bytes, but the header describes 16 bytes of voxels from byte 1",
        ),
        (
            "far",
            1e12,
            "16 bytes, but the header describes 16 bytes of voxels from byte",
        ),
        ("nan", f32::NAN, "vox_offset NaN"),
    ] {
        let hdr = pair(name, offset, &ramp[..15 + usize::from(name != "short")]);
        let err = refused(&hdr);
        assert!(err.contains(says), "{name}: {err}");
        let bytes = std::fs::read(&hdr).unwrap();
        let cost = decode_cost(&hdr, &bytes).expect_err(name).to_string();
        assert!(cost.contains(says), "{name}: {cost}");
    }
}

/// A .nii.gz is inflated up to the volume its header declares plus a little; what follows
/// is never inflated. Shown with a corrupt gzip trailer (CRC) 2 MiB past the volume: read
/// to the end it would be an error; one within the slack still is.
#[test]
fn nifti_gzip_is_inflated_only_as_far_as_the_header_declares() {
    let dir = tempfile::tempdir().unwrap();
    for (tail, corrupt_is_seen) in [(2 << 20, false), (1000, true)] {
        let mut raw = nifti_ramp(352.0);
        raw.extend(std::iter::repeat_n(7u8, tail));
        let mut gz = gzip(&raw);
        let crc = gz.len() - 8;
        gz[crc] ^= 0xFF;
        let path = write(dir.path(), &format!("tail{tail}.nii.gz"), &gz);
        match load_rgb(&path) {
            Ok(img) => {
                assert!(!corrupt_is_seen, "tail {tail}: the bad CRC was not seen");
                assert_eq!(img.as_raw(), &nifti_ramp_picture());
            }
            Err(e) => {
                assert!(corrupt_is_seen, "tail {tail}: {e}");
                assert!(e.to_string().contains("corrupt gzip data"), "{e}");
            }
        }
    }
}

// ---- In a child process: no abort, bounded memory ----

use crate::common::Measured as Ended;

/// `medvlm ask` on `image` with the tiny model, measured (see [`crate::common::measure`]).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn ask(image: &Path) -> Ended {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-a");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_medvlm"));
    cmd.args([
        "ask",
        "--model",
        model.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--question",
        "q",
        "--max-new-tokens",
        "1",
    ]);
    crate::common::measure(cmd, std::time::Duration::from_secs(120))
        .expect("ptrace, to measure a child's peak memory")
}

/// Peak RSS allowed to `medvlm ask` on a hostile file. The tiny model's run on a small
/// PNG peaks near 20 MB; the hostile files claim gigabytes (or, nested, would overflow
/// the stack first).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ASK_PEAK: u64 = 300 << 20;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn assert_clean_failure(what: &str, end: &Ended, says: &str) {
    assert_eq!(
        end.signal, None,
        "{what}: killed by signal {:?}: {}",
        end.signal, end.stderr
    );
    assert_eq!(
        end.code,
        Some(1),
        "{what}: exit {:?}: {}",
        end.code,
        end.stderr
    );
    let lines: Vec<&str> = end
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(lines.len(), 1, "{what}: {}", end.stderr);
    assert!(lines[0].contains(says), "{what}: {}", end.stderr);
    assert!(
        end.peak < ASK_PEAK,
        "{what}: peak RSS {} MB",
        end.peak >> 20
    );
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn ask_fails_cleanly_on_hostile_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    for (enc, depth) in [
        (Enc::ExplicitLe, 2_400),
        (Enc::Implicit, 20_000),
        (Enc::ExplicitBe, 200_000),
        (Enc::Deflated, 200_000),
    ] {
        let path = write(
            dir.path(),
            &format!("deep{depth}-{enc:?}.dcm"),
            &nested_image(enc, depth, false),
        );
        let end = ask(&path);
        let what = format!("depth {depth} {enc:?}");
        assert_clean_failure(&what, &end, "nested more than 128 deep");
        report.push(format!("{what}: peak RSS {} MB", end.peak >> 20));
    }
    for liar in liars() {
        let path = write(dir.path(), &format!("{}.dcm", liar.name), &liar.bytes);
        let end = ask(&path);
        assert_clean_failure(liar.name, &end, liar.says);
        report.push(format!("{}: peak RSS {} MB", liar.name, end.peak >> 20));
    }
    let bomb = write(dir.path(), "bomb.dcm", &deflate_bomb());
    let end = ask(&bomb);
    assert_clean_failure("deflate bomb", &end, "inflates to more than 512 MiB");
    report.push(format!("deflate bomb: peak RSS {} MB", end.peak >> 20));

    // NIfTI: a header declaring 8 GB over 16 bytes of data, as .nii and .nii.gz.
    let mut large = nifti_header(&[2048, 2048, 1000], 4, 16, 352.0);
    large.extend_from_slice(&[0; 20]);
    for (name, bytes) in [("large.nii", large.clone()), ("large.nii.gz", gzip(&large))] {
        let path = write(dir.path(), name, &bytes);
        let end = ask(&path);
        assert_clean_failure(name, &end, "truncated NIfTI file");
        report.push(format!("{name}: peak RSS {} MB", end.peak >> 20));
    }
    println!("{}", report.join("\n"));
}

/// A .nii.gz bomb: a 4x4 volume followed by 1 GiB of zeros (about 1 MiB compressed). It
/// loads, inflating only the volume and the slack after it: little memory, little time.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn nifti_gzip_bomb_is_not_inflated() {
    let dir = tempfile::tempdir().unwrap();
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(&nifti_ramp(352.0)).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..1024 {
        z.write_all(&zeros).unwrap();
    }
    let path = write(dir.path(), "bomb.nii.gz", &z.finish().unwrap());
    let start = std::time::Instant::now();
    let end = ask(&path);
    assert_eq!((end.signal, end.code), (None, Some(0)), "{}", end.stderr);
    assert!(end.peak < ASK_PEAK, "peak RSS {} MB", end.peak >> 20);
    println!(
        "nii.gz bomb: peak RSS {} MB, {:?}",
        end.peak >> 20,
        start.elapsed()
    );
}

// ---- decode_cost bounds what a decode spends ----

/// The child side of `decode_cost_bounds_the_decode`: decodes the file named by
/// MEDVLM_DECODE_CHILD and prints how far its resident memory rose above where it was once
/// the file was read (the kernel's peak, VmHWM, reset through /proc/self/clear_refs).
#[test]
#[ignore = "run by decode_cost_bounds_the_decode in a child process"]
fn decode_child() {
    let Ok(file) = std::env::var("MEDVLM_DECODE_CHILD") else {
        panic!("MEDVLM_DECODE_CHILD is not set: this test is run by another");
    };
    let path = PathBuf::from(file);
    let bytes = std::fs::read(&path).unwrap();
    let status = |key: &str| -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = s.lines().find(|l| l.starts_with(key)).unwrap();
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    };
    // One-time costs first (dicom-rs builds its dictionary on first use, the standard
    // library its buffers): the server has paid them before any request.
    let warm = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/medical");
    for f in [
        "CT_small.dcm",
        "synthetic/deflate.dcm",
        "synthetic/small4d.nii.gz",
    ] {
        medvlm::processor::image::load_rgb(&warm.join(f)).unwrap();
    }
    let before = status("VmRSS:");
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
    // From the bytes, as a server holds them: decode_cost counts what comes on top.
    let img = decode_rgb(&bytes).unwrap();
    let peak = status("VmHWM:");
    drop(img);
    println!("DECODE_CHILD rise={}", peak.saturating_sub(before));
}

/// A 16-bit grey image of `cols` x `rows` in `enc`, values a ramp.
fn big_grey(enc: Enc, rows: u16, cols: u16) -> Vec<u8> {
    dicom(enc, |ds| {
        sop(ds);
        pixel_module(ds, rows, cols);
        let px: Vec<u8> = (0..u32::from(rows) * u32::from(cols))
            .flat_map(|i| enc.u16((i % 4096) as u16))
            .collect();
        ds.element(0x7FE0, 0x0010, b"OW", &px);
    })
}

/// An 8-bit RGB image of `cols` x `rows`, colour by pixel.
fn big_rgb(rows: u16, cols: u16) -> Vec<u8> {
    dicom(Enc::ExplicitLe, |ds| {
        sop(ds);
        ds.us(0x0028, 0x0002, 3)
            .element(0x0028, 0x0004, b"CS", b"RGB ")
            .us(0x0028, 0x0006, 0)
            .us(0x0028, 0x0010, rows)
            .us(0x0028, 0x0011, cols)
            .us(0x0028, 0x0100, 8)
            .us(0x0028, 0x0101, 8)
            .us(0x0028, 0x0102, 7)
            .us(0x0028, 0x0103, 0);
        let n = usize::from(rows) * usize::from(cols) * 3;
        let mut px: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        px.resize(n.next_multiple_of(2), 0);
        ds.element(0x7FE0, 0x0010, b"OB", &px);
    })
}

/// A 256x256x40 int16 NIfTI volume.
fn big_nifti() -> Vec<u8> {
    let mut f = nifti_header(&[256, 256, 40], 4, 16, 352.0);
    f.extend_from_slice(&[0; 4]);
    f.extend((0..256 * 256 * 40u32).flat_map(|i| ((i % 3000) as i16).to_le_bytes()));
    f
}

/// For real and large files: the memory a decode's resident set rises by (measured in a
/// child process) is at most what `decode_cost` said, and not wildly less either (the
/// server admits decodes by it).
#[cfg(target_os = "linux")]
#[test]
fn decode_cost_bounds_the_decode() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/medical");
    let mut files: Vec<PathBuf> = [
        "CT_small.dcm",
        "MR_small_RLE.dcm",
        "JPEG-lossy.dcm",
        "examples_ybr_color.dcm",
        "anatomical.nii",
        "synthetic/deflate.dcm",
        "synthetic/big_endian.dcm",
        "synthetic/multiframe.dcm",
        "synthetic/small4d.nii.gz",
    ]
    .iter()
    .map(|f| fixtures.join(f))
    .collect();
    files.push(write(
        dir.path(),
        "grey-implicit.dcm",
        &big_grey(Enc::Implicit, 2048, 2048),
    ));
    files.push(write(
        dir.path(),
        "grey-deflated.dcm",
        &big_grey(Enc::Deflated, 1024, 2048),
    ));
    files.push(write(
        dir.path(),
        "grey-be.dcm",
        &big_grey(Enc::ExplicitBe, 1500, 1000),
    ));
    files.push(write(dir.path(), "rgb.dcm", &big_rgb(1500, 2000)));
    files.push(write(dir.path(), "volume.nii", &big_nifti()));
    files.push(write(dir.path(), "volume.nii.gz", &gzip(&big_nifti())));
    let exe = std::env::current_exe().unwrap();
    let mut report = Vec::new();
    for path in files {
        let bytes = std::fs::read(&path).unwrap();
        let cost = decode_cost(&path, &bytes).unwrap_or_else(|e| panic!("{e}"));
        let out = std::process::Command::new(&exe)
            .args([
                "medical_hostile::decode_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("MEDVLM_DECODE_CHILD", &path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let rise: u64 = stdout
            .lines()
            .find_map(|l| Some(l.split_once("DECODE_CHILD rise=")?.1))
            .unwrap_or_else(|| {
                panic!(
                    "{}: {stdout} {}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr)
                )
            })
            .parse()
            .unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        report.push(format!(
            "{name:24} {:>8} bytes: decode_cost {:>6} KiB, RSS rose {:>6} KiB",
            bytes.len(),
            cost >> 10,
            rise >> 10
        ));
        assert!(rise <= cost, "{name}: rose {rise} > cost {cost}");
        // Generous (it is an upper bound of every path), but not by orders of magnitude.
        assert!(
            cost <= 8 * rise + (4 << 20),
            "{name}: cost {cost} for a rise of {rise}"
        );
    }
    println!("{}", report.join("\n"));
}
