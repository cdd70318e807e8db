//! Reading GGUF files, llama.cpp's single-file format (header, key-value metadata, tensor
//! table, aligned tensor data), as its specification (ggml's docs/gguf.md, versions 2 and 3)
//! and gguf-py 0.19's reader define it. Only the container: what the tensors and keys mean
//! for a Qwen2-VL is [`crate::import`]'s business.
//!
//! The file is memory-mapped and every length, count and offset in it is checked against
//! the file's size before it is used, so a truncated or hostile file is one error naming it,
//! never a panic or an allocation the file's numbers ask for.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};

/// ggml's tensor types, by their number in the file (ggml.h's `enum ggml_type`), with the
/// block size (values per block) and bytes per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: Self = Self(0);
    pub const F16: Self = Self(1);
    pub const Q4_0: Self = Self(2);
    pub const Q4_1: Self = Self(3);
    pub const Q8_0: Self = Self(8);
    pub const Q4_K: Self = Self(12);
    pub const Q6_K: Self = Self(14);
    pub const BF16: Self = Self(30);

    /// (name, values per block, bytes per block) of the types ggml defines, for sizes and
    /// messages; `None` for a number ggml does not use.
    fn info(self) -> Option<(&'static str, usize, usize)> {
        Some(match self.0 {
            0 => ("F32", 1, 4),
            1 => ("F16", 1, 2),
            2 => ("Q4_0", 32, 18),
            3 => ("Q4_1", 32, 20),
            6 => ("Q5_0", 32, 22),
            7 => ("Q5_1", 32, 24),
            8 => ("Q8_0", 32, 34),
            9 => ("Q8_1", 32, 36),
            10 => ("Q2_K", 256, 84),
            11 => ("Q3_K", 256, 110),
            12 => ("Q4_K", 256, 144),
            13 => ("Q5_K", 256, 176),
            14 => ("Q6_K", 256, 210),
            15 => ("Q8_K", 256, 292),
            16 => ("IQ2_XXS", 256, 66),
            17 => ("IQ2_XS", 256, 74),
            18 => ("IQ3_XXS", 256, 98),
            19 => ("IQ1_S", 256, 50),
            20 => ("IQ4_NL", 32, 18),
            21 => ("IQ3_S", 256, 110),
            22 => ("IQ2_S", 256, 82),
            23 => ("IQ4_XS", 256, 136),
            24 => ("I8", 1, 1),
            25 => ("I16", 1, 2),
            26 => ("I32", 1, 4),
            27 => ("I64", 1, 8),
            28 => ("F64", 1, 8),
            29 => ("IQ1_M", 256, 56),
            30 => ("BF16", 1, 2),
            34 => ("TQ1_0", 256, 54),
            35 => ("TQ2_0", 256, 66),
            39 => ("MXFP4", 32, 17),
            _ => return None,
        })
    }

    pub fn name(self) -> String {
        match self.info() {
            Some((n, _, _)) => n.to_string(),
            None => format!("type {}", self.0),
        }
    }

    /// Bytes a tensor of `ne` (ggml order: the innermost dimension first) takes, `None` when
    /// the type is unknown, the rows are not whole blocks or the size overflows.
    fn bytes(self, ne: &[u64]) -> Option<u64> {
        let (_, block, size) = self.info()?;
        let inner = *ne.first()?;
        if inner % block as u64 != 0 {
            return None;
        }
        let mut n = inner / block as u64 * size as u64;
        for &d in &ne[1..] {
            n = n.checked_mul(d)?;
        }
        Some(n)
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i128),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Bool(_) => "a boolean",
            Value::Str(_) => "a string",
            Value::Array(_) => "an array",
        }
    }
}

/// One tensor of the file: its shape as transformers writes it (outermost dimension first,
/// the reverse of ggml's `ne`), its type and where its bytes are.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub shape: Vec<usize>,
    pub dtype: GgmlType,
    start: usize,
    len: usize,
}

/// An opened GGUF file.
pub struct Gguf {
    path: PathBuf,
    map: memmap2::Mmap,
    meta: BTreeMap<String, Value>,
    tensors: BTreeMap<String, TensorInfo>,
    /// Tensor names in file order.
    order: Vec<String>,
}

/// Nesting allowed for arrays of arrays (the format allows them; no file needs more than one
/// level, and unbounded nesting is unbounded recursion).
const MAX_DEPTH: usize = 4;

struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        let rest = (self.buf.len() - self.at) as u64;
        if n > rest {
            bail!(
                "the header ends early (at byte {}, {n} more bytes needed, the file has {rest})",
                self.at
            );
        }
        let s = &self.buf[self.at..self.at + n as usize];
        self.at += n as usize;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| anyhow!("a string at byte {} is not UTF-8", self.at))
    }
    /// A count of items of at least `min_size` bytes each, refused when the rest of the file
    /// could not hold them (so no count from the file sizes an allocation by itself).
    fn count(&mut self, min_size: u64, what: &str) -> Result<usize> {
        let n = self.u64()?;
        let rest = (self.buf.len() - self.at) as u64;
        if n.saturating_mul(min_size) > rest {
            bail!("{what} count {n} cannot fit in the {rest} bytes left");
        }
        Ok(n as usize)
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        let b = |c: &mut Self, n| c.take(n);
        Ok(match ty {
            0 => Value::Int(b(self, 1)?[0] as i128),
            1 => Value::Int(b(self, 1)?[0] as i8 as i128),
            2 => Value::Int(u16::from_le_bytes(b(self, 2)?.try_into().unwrap()) as i128),
            3 => Value::Int(i16::from_le_bytes(b(self, 2)?.try_into().unwrap()) as i128),
            4 => Value::Int(self.u32()? as i128),
            5 => Value::Int(self.u32()? as i32 as i128),
            6 => Value::Float(f32::from_le_bytes(b(self, 4)?.try_into().unwrap()) as f64),
            7 => match b(self, 1)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                v => bail!("a boolean at byte {} is {v}, not 0 or 1", self.at - 1),
            },
            8 => Value::Str(self.string()?),
            9 => {
                if depth >= MAX_DEPTH {
                    bail!("arrays nested more than {MAX_DEPTH} deep");
                }
                let inner = self.u32()?;
                let size = match inner {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    // A string or an array is at least its 8-byte length.
                    8..=12 => 8,
                    t => bail!("an array of unknown value type {t}"),
                };
                let n = self.count(size, "array")?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(inner, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::Int(self.u64()? as i128),
            11 => Value::Int(self.u64()? as i64 as i128),
            12 => Value::Float(f64::from_le_bytes(b(self, 8)?.try_into().unwrap())),
            t => bail!("unknown value type {t} at byte {}", self.at - 4),
        })
    }
}

impl Gguf {
    /// Opens and checks a GGUF file: the magic, the version (2 or 3), every key and tensor
    /// entry, and that each tensor's bytes lie inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path)
            .map_err(|e| crate::files::io_error(path, "cannot read", e))?;
        if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            bail!("{}: a directory, not a GGUF file", path.display());
        }
        // SAFETY: the file is only read, and medvlm never writes to a file it has mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| crate::files::io_error(path, "cannot map", e))?;
        Self::parse(path, map)
            .map_err(|e| anyhow!("{}: not a valid GGUF file: {e}", path.display()))
    }

    fn parse(path: &Path, map: memmap2::Mmap) -> Result<Self> {
        let mut c = Cursor { buf: &map, at: 0 };
        if c.take(4).ok() != Some(b"GGUF".as_slice()) {
            bail!("it does not start with \"GGUF\"");
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            bail!("version {version} (medvlm reads versions 2 and 3)");
        }
        // A tensor entry is at least its name's length, dimension count, type and offset.
        let n_tensors = c.u64()?;
        let n_kv = c.count(8 + 4 + 1, "key")?;
        let mut meta = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty, 0).map_err(|e| anyhow!("key {key}: {e}"))?;
            if meta.insert(key.clone(), v).is_some() {
                bail!("key {key} appears twice");
            }
        }
        let rest = (c.buf.len() - c.at) as u64;
        if n_tensors.saturating_mul(8 + 4 + 4 + 8) > rest {
            bail!("tensor count {n_tensors} cannot fit in the {rest} bytes left");
        }
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let nd = c.u32()?;
            if nd == 0 || nd > 4 {
                bail!("tensor {name} has {nd} dimensions (ggml allows 1 to 4)");
            }
            let ne = (0..nd).map(|_| c.u64()).collect::<Result<Vec<u64>>>()?;
            let dtype = GgmlType(c.u32()?);
            let offset = c.u64()?;
            raw.push((name, ne, dtype, offset));
        }
        let align = match meta.get("general.alignment") {
            None => 32,
            Some(Value::Int(a)) if *a > 0 && (*a as u64).is_power_of_two() && *a <= 1 << 20 => {
                *a as u64
            }
            Some(v) => bail!("general.alignment is {v:?}, not a power of two"),
        };
        let data_start = (c.at as u64).div_ceil(align) * align;
        let file_len = map.len() as u64;
        let mut tensors = BTreeMap::new();
        let mut order = Vec::with_capacity(raw.len());
        for (name, ne, dtype, offset) in raw {
            let len = dtype.bytes(&ne).ok_or_else(|| match dtype.info() {
                None => anyhow!("tensor {name} has unknown type {}", dtype.0),
                Some((t, block, _)) => anyhow!(
                    "tensor {name}: {t} rows are blocks of {block} values, its shape {ne:?} \
                     is not (or is too large)"
                ),
            })?;
            if offset % align != 0 {
                bail!("tensor {name} starts at offset {offset}, not a multiple of {align}");
            }
            let start = data_start.saturating_add(offset);
            if start.saturating_add(len) > file_len {
                bail!(
                    "tensor {name} ({len} bytes at {start}) runs past the end of the file \
                     ({file_len} bytes): the file is truncated"
                );
            }
            let shape = ne.iter().rev().map(|&d| d as usize).collect();
            let info = TensorInfo {
                shape,
                dtype,
                start: start as usize,
                len: len as usize,
            };
            if tensors.insert(name.clone(), info).is_some() {
                bail!("tensor {name} appears twice");
            }
            order.push(name);
        }
        Ok(Self {
            path: path.to_path_buf(),
            map,
            meta,
            tensors,
            order,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The metadata value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta.get(key)
    }

    fn missing(&self, key: &str) -> anyhow::Error {
        anyhow!("{}: no {key} in the metadata", self.path.display())
    }

    fn wrong(&self, key: &str, want: &str, v: &Value) -> anyhow::Error {
        anyhow!(
            "{}: {key} is {}, expected {want}",
            self.path.display(),
            v.kind()
        )
    }

    pub fn str(&self, key: &str) -> Result<&str> {
        match self.get(key) {
            Some(Value::Str(s)) => Ok(s),
            Some(v) => Err(self.wrong(key, "a string", v)),
            None => Err(self.missing(key)),
        }
    }

    /// A non-negative integer that fits a `usize`.
    pub fn usize(&self, key: &str) -> Result<usize> {
        match self.get(key) {
            Some(Value::Int(i)) => usize::try_from(*i)
                .map_err(|_| anyhow!("{}: {key} is {i}, out of range", self.path.display())),
            Some(v) => Err(self.wrong(key, "an integer", v)),
            None => Err(self.missing(key)),
        }
    }

    pub fn f64(&self, key: &str) -> Result<f64> {
        match self.get(key) {
            Some(Value::Float(f)) => Ok(*f),
            Some(Value::Int(i)) => Ok(*i as f64),
            Some(v) => Err(self.wrong(key, "a number", v)),
            None => Err(self.missing(key)),
        }
    }

    pub fn array(&self, key: &str) -> Result<&[Value]> {
        match self.get(key) {
            Some(Value::Array(a)) => Ok(a),
            Some(v) => Err(self.wrong(key, "an array", v)),
            None => Err(self.missing(key)),
        }
    }

    /// An array of numbers.
    pub fn f64s(&self, key: &str) -> Result<Vec<f64>> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                Value::Float(f) => Ok(*f),
                Value::Int(i) => Ok(*i as f64),
                v => Err(self.wrong(key, "an array of numbers", v)),
            })
            .collect()
    }

    /// An array of strings.
    pub fn strs(&self, key: &str) -> Result<Vec<&str>> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                Value::Str(s) => Ok(s.as_str()),
                v => Err(self.wrong(key, "an array of strings", v)),
            })
            .collect()
    }

    /// Tensor names in the order the file lists them.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(String::as_str)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// A tensor's bytes as ggml stores them (for block types: each row's blocks in order).
    pub fn data(&self, name: &str) -> Result<&[u8]> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| anyhow!("{}: no tensor {name}", self.path.display()))?;
        Ok(&self.map[t.start..t.start + t.len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF file by hand (version 3): `kv` already encoded, tensors as (name, ne, type,
    /// data).
    fn file(kv: &[u8], n_kv: u64, tensors: &[(&str, &[u64], u32, Vec<u8>)]) -> Vec<u8> {
        let mut f = b"GGUF".to_vec();
        f.extend(3u32.to_le_bytes());
        f.extend((tensors.len() as u64).to_le_bytes());
        f.extend(n_kv.to_le_bytes());
        f.extend(kv);
        let mut offset = 0u64;
        for (name, ne, ty, data) in tensors {
            f.extend((name.len() as u64).to_le_bytes());
            f.extend(name.as_bytes());
            f.extend((ne.len() as u32).to_le_bytes());
            for d in *ne {
                f.extend(d.to_le_bytes());
            }
            f.extend(ty.to_le_bytes());
            f.extend(offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        while !f.len().is_multiple_of(32) {
            f.push(0);
        }
        for (_, _, _, data) in tensors {
            f.extend(data);
            while !f.len().is_multiple_of(32) {
                f.push(0);
            }
        }
        f
    }

    fn string_kv(key: &str, v: &str) -> Vec<u8> {
        let mut b = (key.len() as u64).to_le_bytes().to_vec();
        b.extend(key.as_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend((v.len() as u64).to_le_bytes());
        b.extend(v.as_bytes());
        b
    }

    fn open_bytes(bytes: &[u8]) -> Result<Gguf> {
        let dir = std::env::temp_dir().join(format!(
            "medvlm-gguf-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::write(&dir, bytes)?;
        let r = Gguf::open(&dir);
        std::fs::remove_file(&dir)?;
        r
    }

    #[test]
    fn reads_keys_and_tensors_in_ggml_order() {
        let data: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let kv = string_kv("general.architecture", "qwen2vl");
        let g = open_bytes(&file(&kv, 1, &[("t", &[3, 2], 0, data.clone())])).unwrap();
        assert_eq!(g.str("general.architecture").unwrap(), "qwen2vl");
        let t = g.tensor("t").unwrap();
        // ne [3, 2] is 2 rows of 3.
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(g.data("t").unwrap(), &data[..]);
    }

    #[test]
    fn hostile_headers_are_one_error_not_a_panic() {
        let data: Vec<u8> = vec![0; 24];
        let kv = string_kv("general.architecture", "qwen2vl");
        let good = file(&kv, 1, &[("t", &[3, 2], 0, data)]);
        // Every truncation of the file that loses a byte of it is refused (the data section
        // included; the last 8 bytes are the padding after the 24 of data).
        for cut in 0..good.len() - 8 {
            let e = open_bytes(&good[..cut]).err().map(|e| e.to_string());
            assert!(e.is_some(), "a file cut at {cut} bytes was accepted");
        }
        // Counts the file cannot hold, before anything is allocated for them.
        let mut huge = good.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = open_bytes(&huge).err().unwrap().to_string();
        assert!(e.contains("key count"), "{e}");
        let mut huge = good.clone();
        huge[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(open_bytes(&huge).is_err());
        // A string length past the end.
        let mut bad = good.clone();
        bad[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(open_bytes(&bad).is_err());
        // Not GGUF, unknown version, unknown tensor type, rows not whole blocks.
        assert!(open_bytes(b"GGML\x03\0\0\0").is_err());
        let mut v = good.clone();
        v[4] = 9;
        assert!(open_bytes(&v)
            .err()
            .unwrap()
            .to_string()
            .contains("version 9"));
        let q = file(&kv, 1, &[("t", &[3, 2], 8, vec![0; 34])]);
        let e = open_bytes(&q).err().unwrap().to_string();
        assert!(e.contains("blocks of 32"), "{e}");
        let u = file(&kv, 1, &[("t", &[3, 2], 99, vec![0; 24])]);
        assert!(open_bytes(&u)
            .err()
            .unwrap()
            .to_string()
            .contains("unknown type 99"));
    }
}
